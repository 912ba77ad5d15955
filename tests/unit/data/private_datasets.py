"""Tiny private datasets for the ``folder`` and ``npz`` sources, made with PIL and numpy
(imported as fixtures by ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("benign", "malignant", "normal")
PER_CLASS = 6  # 3 RGB 40x40 PNG, 2 grey 30x50 JPEG, 1 RGBA 36x36 PNG -> split 4 / 1 / 1


def write_class_images(folder: Path, rng: np.random.Generator, count: int = PER_CLASS) -> None:
    """``count`` images of mixed sizes and modes into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        kind = i % PER_CLASS
        if kind < 3:
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB").save(
                folder / f"rgb{i}.png")
        elif kind < 5:
            Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8), "L").save(
                folder / f"grey{i}.JPG", quality=95)
        else:
            Image.fromarray(rng.integers(0, 256, (36, 36, 4), dtype=np.uint8), "RGBA").save(
                folder / f"rgba{i}.png")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/<class>/*`` with three classes of six mixed images each (not split)."""
    root = tmp_path_factory.mktemp("folder-data") / "lesions"
    rng = np.random.default_rng(1)
    for cls in CLASSES:
        write_class_images(root / cls, rng)
    (root / ".hidden").mkdir()  # ignored
    (root / "notes.txt").write_text("not an image")  # ignored
    return root


@pytest.fixture(scope="session")
def presplit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/{train,val,test}/{neg,pos}/*`` grey PNGs (train 5 + 3, val 2 + 1, test 2 + 2)."""
    root = tmp_path_factory.mktemp("presplit-data") / "xray"
    rng = np.random.default_rng(2)
    sizes = {"train": (5, 3), "val": (2, 1), "test": (2, 2)}
    for split, counts in sizes.items():
        for cls, n in zip(("neg", "pos"), counts, strict=True):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(
                    root / split / cls / f"{i}.png")
    return root


def write_npz(path: Path, shape: tuple[int, ...], num_classes: int,
              counts: tuple[int, int, int] = (40, 8, 12), seed: int = 0,
              multi_label: bool = False, **replace: np.ndarray | None) -> Path:
    """A MedMNIST-layout file of random uint8 images with labels ``0..num_classes-1``
    (``replace``: arrays to put instead, ``None`` to leave a key out)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        width = num_classes if multi_label else 1
        high = 2 if multi_label else num_classes
        arrays[f"{split}_labels"] = rng.integers(0, high, (n, width)).astype(np.uint8)
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
