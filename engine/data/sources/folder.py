"""The ``folder`` source: an image folder, one sub-folder per class.

Layouts (image files ``*.png``, ``*.jpg``, ``*.jpeg``, any case, directly in the class folder;
hidden folders are ignored):

* ``<path>/<class>/*``: split here, per class, seeded (``split`` fractions, ``seed``);
* ``<path>/{train,val,test}/<class>/*``: used as given (all three folders must exist).

Entry keys:

``path``
    The folder, relative to the data root unless absolute (required).
``label_names``
    The class folder names in label order (default: the sorted class folder names, read
    when the shards are built); they must match the class folders.
``task``
    ``binary``, ``multi-class`` or ``ordinal`` (default: ``binary`` for two classes, else
    ``multi-class``).
``split``
    ``[train, val, test]`` fractions, each positive, summing to 1 (default ``[0.7, 0.1, 0.2]``).
``seed``
    Seed of the split (default 0); the same files and seed always give the same split.

Any image size and mode is read (see :mod:`engine.data.images`: non-square images are
centre-cropped to a square); when any image of the domain is in colour, grey ones are
repeated to RGB. Images are then unified to ``3 x 28 x 28`` like every other source's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.errors import DataError
from engine.data.images import IMAGE_SUFFIXES, read_image
from engine.data.medmnist import SPLITS
from engine.data.mednist import stratified_take
from engine.data.sources.base import (
    RawSplit,
    Source,
    SourceContext,
    check_keys,
    common_fields,
    existing_path,
    files_fingerprint,
    parse_label_names,
    parse_path,
    parse_task,
    resolve_path,
)
from engine.data.spec import DomainSpec

logger = logging.getLogger(__name__)

DEFAULT_SPLIT: tuple[float, float, float] = (0.7, 0.1, 0.2)
_TASKS = ("binary", "multi-class", "ordinal")
_WHOLE = ""  # the one part of a folder that is not split yet


@dataclass(frozen=True)
class FolderLayout:
    """The image files of a folder: part (``train`` / ``val`` / ``test``, or ``""`` when the
    folder is not split) -> class -> sorted files."""

    root: Path
    parts: dict[str, dict[str, list[Path]]]

    @property
    def presplit(self) -> bool:
        """Whether the folder comes split into ``train`` / ``val`` / ``test``."""
        return _WHOLE not in self.parts

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names (over all parts)."""
        return sorted({c for part in self.parts.values() for c in part})

    def items(self, part: str, label_names: tuple[str, ...]) -> list[tuple[str, int, Path]]:
        """``(id, label, file)`` of one part, sorted by id (the path under the root)."""
        index = {c: i for i, c in enumerate(label_names)}
        return sorted((f.relative_to(self.root).as_posix(), index[c], f)
                      for c, files in self.parts[part].items() for f in files)


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[sub.name] = sorted(f for f in sub.iterdir()
                               if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    return out


def scan_folder(root: Path) -> FolderLayout:
    """Find the layout and image files of an image folder.

    Raises
    ------
    DataError
        When ``root`` is not a folder, holds only some of ``train`` / ``val`` / ``test``, or
        has a class without images.
    """
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (the folder source reads <path>/<class>/*.png)")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present and len(present) < len(SPLITS):
        raise DataError(f"{root} has {present} but not all of {list(SPLITS)}: give all three "
                        "split folders or none (then the folder is split here)")
    parts = {s: _class_folders(root / s) for s in SPLITS} if present else \
        {_WHOLE: _class_folders(root)}
    layout = FolderLayout(root, parts)
    for cls in layout.classes:
        if not any(part.get(cls) for part in parts.values()):
            raise DataError(f"{root}: class folder {cls!r} holds no .png / .jpg / .jpeg images")
    if not layout.classes:
        raise DataError(f"{root} holds no class folders (expected <class>/*.png or "
                        "train|val|test/<class>/*.png)")
    return layout


def _parse_split(name: str, value: object) -> list[float]:
    try:
        fractions = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        fractions = []
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"domain {name!r}: key 'split' must be three positive [train, val, "
                         f"test] fractions summing to 1, got {value!r}")
    return fractions


def _stack(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    shapes = {im.shape for im in images}
    return np.stack(images) if len(shapes) == 1 else images


class FolderSource(Source):
    """An image folder with one sub-folder per class (see the module docstring)."""

    def parse(self, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Check the keys (no file is read: the class folders are found when built)."""
        check_keys(name, entry, {"path", "label_names", "task", "split", "seed"},
                   required=("path",))
        labels = (parse_label_names(name, entry["label_names"], minimum=2)
                  if "label_names" in entry else ())
        seed = entry.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"domain {name!r}: key 'seed' must be an integer, got {seed!r}")
        options: dict[str, Any] = {
            "split": _parse_split(name, entry.get("split", DEFAULT_SPLIT)), "seed": seed}
        if "task" in entry:
            task = parse_task(name, entry["task"], _TASKS)
            if task == "binary" and labels and len(labels) != 2:
                raise ValueError(f"domain {name!r}: a binary task needs exactly 2 "
                                 f"'label_names', got {list(labels)}")
        else:
            task = "binary" if len(labels) == 2 else "multi-class"
            options["auto_task"] = True
        return DomainSpec(task=task, label_names=labels, path=parse_path(name, entry["path"]),
                          options=options, **common_fields(name, entry))

    def resolve(self, spec: DomainSpec, ctx: SourceContext) -> DomainSpec:
        """The spec with the label names (and default task) of the class folders."""
        layout = scan_folder(existing_path(spec, ctx.data_root, "image folder"))
        return self._resolved(spec, layout)

    @staticmethod
    def _resolved(spec: DomainSpec, layout: FolderLayout) -> DomainSpec:
        found = layout.classes
        if spec.label_names and sorted(spec.label_names) != found:
            raise DataError(f"{layout.root}: class folders {found} do not match the "
                            f"label_names {list(spec.label_names)} of domain {spec.name!r}")
        labels = spec.label_names or tuple(found)
        if len(labels) < 2:
            raise DataError(f"{layout.root}: domain {spec.name!r} needs two or more class "
                            f"folders, found {found}")
        task = spec.task
        if spec.options.get("auto_task"):
            task = "binary" if len(labels) == 2 else "multi-class"
        elif task == "binary" and len(labels) != 2:
            raise DataError(f"{layout.root}: domain {spec.name!r} has task 'binary' but "
                            f"{len(labels)} class folders {found}")
        return replace(spec, label_names=labels, task=task)

    def fingerprint(self, spec: DomainSpec, ctx: SourceContext) -> object:
        """A digest of every image file's path, size and mtime (``None`` if no folder)."""
        root = resolve_path(spec, ctx.data_root)
        if not root.is_dir():
            return None
        files = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return files_fingerprint(root, files)

    def _split_items(self, spec: DomainSpec, layout: FolderLayout
                     ) -> dict[str, list[tuple[str, int, Path]]]:
        if layout.presplit:
            return {s: layout.items(s, spec.label_names) for s in SPLITS}
        items = layout.items(_WHOLE, spec.label_names)
        labels = np.array([label for _, label, _ in items], dtype=np.int64)
        parts = stratified_take(labels, np.arange(len(items)), spec.options["split"],
                                np.random.default_rng(spec.options["seed"]))
        return {s: [items[i] for i in idx] for s, idx in zip(SPLITS, parts, strict=True)}

    def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
        """Decode, crop and label every image of every split."""
        layout = scan_folder(existing_path(spec, ctx.data_root, "image folder"))
        spec = self._resolved(spec, layout)
        split_items = self._split_items(spec, layout)
        if not split_items["train"]:
            raise DataError(f"{layout.root}: the train split of domain {spec.name!r} is empty")
        pixels = {s: [read_image(f) for _, _, f in items] for s, items in split_items.items()}
        colour = any(p.ndim == 3 for images in pixels.values() for p in images)
        if colour:
            pixels = {s: [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=-1)
                          for p in images] for s, images in pixels.items()}
        logger.info("read %d images of domain %s from %s",
                    sum(map(len, pixels.values())), spec.name, layout.root)
        return {s: RawSplit(_stack(pixels[s]),
                            np.array([[label] for _, label, _ in items], dtype=np.int64
                                     ).reshape(-1, 1),
                            np.asarray([i for i, _, _ in items], dtype=object),
                            2, 3 if colour else 1)
                for s, items in split_items.items()}

    def count(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, int]:
        """Counts from the file list (no image is decoded)."""
        layout = scan_folder(existing_path(spec, ctx.data_root, "image folder"))
        split_items = self._split_items(self._resolved(spec, layout), layout)
        return {s: len(items) for s, items in split_items.items()}

    def describe(self, spec: DomainSpec) -> str:
        """``"folder:<path>"``."""
        return f"folder:{spec.path}"
