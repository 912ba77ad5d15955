"""MedNIST (MONAI's tutorial dataset): loader and the deterministic server/client split.

The layout is MONAI's, ``MedNIST/<Class>/<nnnnnn>.jpeg`` (64 x 64 grey JPEGs), read from
``<data_root>/mednist/MedNIST/`` or straight from ``<data_root>/mednist/MedNIST.tar.gz``.
"""

from __future__ import annotations

import io
import logging
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.data.download import fetch
from engine.data.errors import DataError

logger = logging.getLogger(__name__)

MEDNIST_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/MedNIST.tar.gz"
MEDNIST_MD5 = "0bc7306e7427e00ad1c5526a6677552d"
MEDNIST_CLASSES: tuple[str, ...] = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
IMAGE_SIZE = 64


@dataclass(frozen=True)
class MedNISTArrays:
    """All of MedNIST in memory.

    Attributes
    ----------
    images
        ``(N, 64, 64)`` uint8, ordered by ``names``.
    labels
        ``(N,)`` int64 indices into :data:`MEDNIST_CLASSES`.
    names
        ``"<Class>/<file>"`` for each image, sorted; the identity used for disjointness.
    """

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]


def mednist_paths(data_root: Path) -> tuple[Path, Path]:
    """The folder and the tarball that may hold MedNIST under ``data_root``."""
    base = Path(data_root) / "mednist"
    return base / "MedNIST", base / "MedNIST.tar.gz"


def _decode(name: str, data: bytes, source: Path) -> np.ndarray:
    try:
        image = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{source}: {name} is not a readable JPEG ({err}); the MedNIST copy is "
                        "corrupt: delete it and download it again") from err
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: {name} has shape {image.shape}, expected "
                        f"({IMAGE_SIZE}, {IMAGE_SIZE})")
    return image


def _iter_folder(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.glob("*/*.jpeg")):
        yield f"{path.parent.name}/{path.name}", path.read_bytes()


def _iter_tar(tarball: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 3 and parts[-1].endswith(".jpeg"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    yield f"{parts[-2]}/{parts[-1]}", handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(f"{tarball} cannot be read ({type(err).__name__}: {err}); it is "
                        "truncated or corrupt: delete it and download it again") from err


def list_mednist(data_root: Path | str) -> tuple[tuple[str, ...], np.ndarray]:
    """Names and class indices of every MedNIST image, without decoding any image.

    Raises
    ------
    DataError
        When MedNIST is not under ``data_root`` (nothing is downloaded here).
    """
    folder, tarball = mednist_paths(Path(data_root))
    if folder.is_dir():
        names = sorted(f"{p.parent.name}/{p.name}" for p in folder.glob("*/*.jpeg"))
    elif tarball.exists():
        try:
            with tarfile.open(tarball, "r:*") as tar:
                names = sorted("/".join(m.name.split("/")[-2:]) for m in tar
                               if m.isfile() and m.name.endswith(".jpeg"))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DataError(f"{tarball} cannot be read ({type(err).__name__}: {err}); it is "
                            "truncated or corrupt: delete it and download it again") from err
    else:
        raise DataError(f"MedNIST: neither {folder} nor {tarball} exists; `umim data prepare` "
                        f"downloads it from {MEDNIST_URL}, or place MedNIST.tar.gz there by hand")
    bad = sorted({n.split("/")[0] for n in names} - set(MEDNIST_CLASSES))
    if bad:
        raise DataError(f"MedNIST under {data_root}: unexpected class folder(s) {bad}")
    labels = np.array([MEDNIST_CLASSES.index(n.split("/")[0]) for n in names], dtype=np.int64)
    return tuple(names), labels


def load_mednist(data_root: Path | str, *, download: bool = True) -> MedNISTArrays:
    """Load every MedNIST image, from the extracted folder or directly from the tarball.

    A missing dataset is downloaded from MONAI's release (MD5-checked) when ``download``
    is true and the network is reachable; otherwise a :class:`DataError` says where to put it.
    """
    folder, tarball = mednist_paths(Path(data_root))
    if folder.is_dir():
        source, items = folder, _iter_folder(folder)
    else:
        if not tarball.exists():
            if not download:
                raise DataError(f"MedNIST: neither {folder} nor {tarball} exists. Place "
                                f"MedNIST.tar.gz (from {MEDNIST_URL}) there or set --data-root.")
            fetch(MEDNIST_URL, tarball, MEDNIST_MD5, what="MedNIST")
        source, items = tarball, _iter_tar(tarball)
    decoded: dict[str, np.ndarray] = {}
    for name, data in items:
        cls = name.split("/")[0]
        if cls not in MEDNIST_CLASSES:
            raise DataError(f"{source}: unexpected class folder {cls!r}; "
                            f"expected {MEDNIST_CLASSES}")
        decoded[name] = _decode(name, data, source)
    if not decoded:
        raise DataError(f"{source} holds no MedNIST/<Class>/*.jpeg images")
    missing = [c for c in MEDNIST_CLASSES if not any(n.startswith(c + "/") for n in decoded)]
    if missing:
        raise DataError(f"{source}: no images for class(es) {missing}; the copy is incomplete")
    names = tuple(sorted(decoded))
    images = np.stack([decoded[n] for n in names])
    labels = np.array([MEDNIST_CLASSES.index(n.split("/")[0]) for n in names], dtype=np.int64)
    logger.info("loaded %d MedNIST images from %s", len(names), source)
    return MedNISTArrays(images=images, labels=labels, names=names)


@dataclass(frozen=True)
class MedNISTSplitSettings:
    """How MedNIST is divided between the server's pool and the client domains."""

    seed: int = 0
    pool_fraction: float = 0.5
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)


@dataclass(frozen=True)
class MedNISTSplit:
    """Indices into :class:`MedNISTArrays` for the server's pool and each client domain."""

    pool: np.ndarray
    domains: dict[str, dict[str, np.ndarray]]


def stratified_take(labels: np.ndarray, candidates: np.ndarray, fractions: Sequence[float],
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``candidates`` into parts of the given fractions, per class, in random order."""
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels[candidates]):
        members = candidates[labels[candidates] == cls]
        members = members[rng.permutation(len(members))]
        bounds = np.round(np.cumsum(fractions) * len(members)).astype(int)
        start = 0
        for i, stop in enumerate(bounds):
            parts[i].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) for p in parts]


def split_mednist(
    labels: np.ndarray,
    domain_classes: dict[str, Sequence[int]],
    *,
    seed: int = 0,
    pool_fraction: float = 0.5,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> MedNISTSplit:
    """Split MedNIST once, deterministically and disjointly, into pool and client domains.

    Per class, ``pool_fraction`` of the images go to the server's unlabelled pool; the
    rest are divided among the client domains that claim the class (each class may belong
    to at most one domain) and split into train / val / test by ``split_fractions``.

    Parameters
    ----------
    labels
        Class index of every image.
    domain_classes
        Domain name -> class indices it holds.
    seed
        Seed of the split; the same seed and file list always give the same split.
    """
    if not 0.0 < pool_fraction < 1.0:
        raise ValueError(f"pool_fraction must be in (0, 1), got {pool_fraction}")
    if abs(sum(split_fractions) - 1.0) > 1e-9 or min(split_fractions) <= 0:
        raise ValueError(f"split_fractions must be positive and sum to 1, got {split_fractions}")
    claimed = [c for classes in domain_classes.values() for c in classes]
    if len(claimed) != len(set(claimed)):
        raise ValueError(f"a MedNIST class is claimed by two domains: {domain_classes}")
    rng = np.random.default_rng(seed)
    pool, clients = stratified_take(labels, np.arange(len(labels)),
                                     (pool_fraction, 1 - pool_fraction), rng)
    domains: dict[str, dict[str, np.ndarray]] = {}
    for name in sorted(domain_classes):
        members = clients[np.isin(labels[clients], list(domain_classes[name]))]
        domain_rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        train, val, test = stratified_take(labels, members, split_fractions, domain_rng)
        domains[name] = {"train": train, "val": val, "test": test}
    return MedNISTSplit(pool=pool, domains=domains)
