"""MedMNIST v2 / MedMNIST+ loader for every dataset in ``medmnist.INFO`` (2D and 3D, all sizes).

Files use the official ``.npz`` layout (``{train,val,test}_{images,labels}``) and live at
``<data_root>/medmnist/<flag>[_<size>].npz``. Every file is validated against ``INFO``
(keys, dtypes, shapes, label ranges, sample counts) and a mismatch raises a
:class:`~engine.data.errors.DataError` that names the file and the problem.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.data.download import fetch
from engine.data.errors import DataError
from engine.data.medmnist_info import medmnist_info
from strategies.types import TaskType

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SIZES_2D: tuple[int, ...] = (28, 64, 128, 224)
SIZES_3D: tuple[int, ...] = (28, 64)

_TASKS: dict[str, TaskType] = {
    "binary-class": "binary",
    "multi-class": "multi-class",
    "ordinal-regression": "ordinal",
    "multi-label, binary-class": "multi-label",
}


@dataclass(frozen=True)
class MedMNISTSpec:
    """What one MedMNIST file must contain.

    Attributes
    ----------
    flag
        Dataset name, e.g. ``"breastmnist"`` or ``"pathmnist_subset"``.
    size
        Side length of the images (28, 64, 128 or 224).
    task
        Task type in umim's vocabulary.
    label_names
        Class names (for multi-label: one name per label).
    in_channels
        1 (grey) or 3 (RGB) for 2D; 1 for 3D volumes.
    spatial_dims
        2 or 3.
    n_samples
        Expected sample count per split.
    url, md5
        Official source and checksum; ``None`` for files that have no public source.
    """

    flag: str
    size: int
    task: TaskType
    label_names: tuple[str, ...]
    in_channels: int
    spatial_dims: int
    n_samples: dict[str, int] = field(hash=False)
    url: str | None
    md5: str | None

    @property
    def filename(self) -> str:
        """File name in the official layout (``flag.npz`` at 28, ``flag_<size>.npz`` else)."""
        return f"{self.flag}.npz" if self.size == 28 else f"{self.flag}_{self.size}.npz"

    @property
    def num_labels(self) -> int:
        """Columns of the label array: the class count for multi-label, else 1."""
        return len(self.label_names) if self.task == "multi-label" else 1

    @property
    def num_classes(self) -> int:
        """Number of classes (multi-label: number of labels)."""
        return len(self.label_names)

    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image as stored in the file."""
        s = self.size
        if self.spatial_dims == 3:
            return (s, s, s)
        return (s, s) if self.in_channels == 1 else (s, s, 3)

    def path(self, data_root: Path) -> Path:
        """Where the file lives under ``data_root``."""
        return Path(data_root) / "medmnist" / self.filename


# Datasets that are not in medmnist.INFO: derived from an official one, described here.
_EXTRA: dict[str, dict] = {
    "pathmnist_subset": {
        "base": "pathmnist",
        "n_samples": {"train": 700, "val": 100, "test": 200},
        "sizes": (28,),
        "note": "the first 1000 images of the official PathMNIST train split, re-split "
        "700/100/200 with numpy default_rng(0).permutation; it has no public download",
    },
}


def available_flags() -> tuple[str, ...]:
    """Every dataset flag the loader knows: all of ``medmnist.INFO`` plus local extras."""
    return (*medmnist_info().keys(), *_EXTRA.keys())


def medmnist_spec(flag: str, size: int = 28) -> MedMNISTSpec:
    """Build the :class:`MedMNISTSpec` of ``flag`` at ``size`` from ``medmnist.INFO``."""
    info = medmnist_info()
    extra = _EXTRA.get(flag)
    base = extra["base"] if extra else flag
    if base not in info:
        raise DataError(f"unknown MedMNIST dataset {flag!r}; known: {', '.join(available_flags())}")
    meta = info[base]
    is_3d = base.endswith("3d")
    sizes = extra["sizes"] if extra else (SIZES_3D if is_3d else SIZES_2D)
    if size not in sizes:
        raise DataError(f"{flag} has no size {size}; available sizes: {list(sizes)}")
    suffix = "" if size == 28 else f"_{size}"
    labels = meta["label"]
    return MedMNISTSpec(
        flag=flag,
        size=size,
        task=_TASKS[meta["task"]],
        label_names=tuple(labels[str(i)] for i in range(len(labels))),
        in_channels=int(meta["n_channels"]),
        spatial_dims=3 if is_3d else 2,
        n_samples=dict(extra["n_samples"] if extra else meta["n_samples"]),
        url=None if extra else meta[f"url{suffix}"],
        md5=None if extra else meta[f"MD5{suffix}"],
    )


@dataclass(frozen=True)
class SplitArrays:
    """One split as raw arrays: ``images`` uint8 as stored, ``labels`` int64 ``(N, L)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_medmnist(
    flag: str,
    size: int = 28,
    data_root: Path | str = ".",
    *,
    download: bool = True,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, SplitArrays]:
    """Load and validate a MedMNIST file, downloading it first if it is missing.

    Parameters
    ----------
    flag, size
        Dataset and image size, e.g. ``("adrenalmnist3d", 64)``.
    data_root
        Folder holding ``medmnist/<file>.npz``.
    download
        Fetch a missing file from its official URL (MD5-checked). When ``False`` or
        offline, a missing file raises a :class:`DataError` saying where to place it.
    splits
        Which splits to read.

    Returns
    -------
    dict
        ``split -> SplitArrays``, validated against ``INFO``.
    """
    spec = medmnist_spec(flag, size)
    path = spec.path(Path(data_root))
    if not path.exists():
        what = f"{flag} ({size}x{size})"
        if not download:
            raise DataError(f"{what}: {path} is missing. Place the official file there"
                            + (f" (from {spec.url}, MD5 {spec.md5})" if spec.url else "")
                            + " or set --data-root / UMIM_DATA_ROOT.")
        fetch(spec.url, path, spec.md5, what=what)
    return _read_validated(spec, path, splits)


def read_label_counts(flag: str, size: int, data_root: Path | str) -> dict[str, int]:
    """Sample counts per split, reading only the label arrays of an existing file."""
    spec = medmnist_spec(flag, size)
    path = spec.path(Path(data_root))
    if not path.exists():
        raise DataError(f"{flag}: {path} is missing; `umim data prepare` downloads it"
                        + (f" from {spec.url}" if spec.url else " (it has no public source)")
                        + ", or place the file there by hand")
    with open_npz(path) as npz:
        check_npz_keys(npz, path, SPLITS)
        return {s: int(read_npz_array(npz, f"{s}_labels", path).shape[0]) for s in SPLITS}


_REDOWNLOAD = "delete it and download it again"


def open_npz(path: Path, hint: str = _REDOWNLOAD):
    """``np.load(path)``; an unreadable file is a :class:`DataError` ending in ``hint``."""
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz file ({type(err).__name__}: {err}); "
                        f"it is probably truncated or corrupt: {hint}") from err


def check_npz_keys(npz, path: Path, splits: tuple[str, ...],
                   hint: str = "It is not an official MedMNIST file: download it again"
                   ) -> None:
    """Require ``<split>_images`` and ``<split>_labels`` for every split."""
    missing = [f"{s}_{k}" for s in splits for k in ("images", "labels") if f"{s}_{k}" not in npz]
    if missing:
        raise DataError(f"{path} lacks key(s) {missing}; it holds {sorted(npz.files)}. {hint}")


def read_npz_array(npz, key: str, path: Path, hint: str = _REDOWNLOAD) -> np.ndarray:
    """One array of an open ``.npz``; a corrupt member is a :class:`DataError`."""
    try:
        return npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise DataError(f"{path}: array {key!r} cannot be read ({type(err).__name__}: {err}); "
                        f"the file is truncated or corrupt: {hint}") from err


def _read_validated(spec: MedMNISTSpec, path: Path, splits: tuple[str, ...]
                    ) -> dict[str, SplitArrays]:
    out: dict[str, SplitArrays] = {}
    with open_npz(path) as npz:
        check_npz_keys(npz, path, splits)
        for split in splits:
            images = read_npz_array(npz, f"{split}_images", path)
            labels = read_npz_array(npz, f"{split}_labels", path)
            validate_split_arrays(f"{path} [{split}]", images, labels,
                                  image_shape=spec.image_shape(), num_labels=spec.num_labels,
                                  num_classes=spec.num_classes, task=spec.task,
                                  expected=spec.n_samples.get(split),
                                  shape_note=f" for {spec.flag} at size {spec.size}")
            out[split] = SplitArrays(images=images, labels=labels.astype(np.int64))
    logger.debug("loaded %s: %s", path, {s: len(a) for s, a in out.items()})
    return out


def validate_split_arrays(where: str, images: np.ndarray, labels: np.ndarray, *,
                          image_shape: tuple[int, ...], num_labels: int, num_classes: int,
                          task: TaskType, expected: int | None = None,
                          shape_note: str = "") -> None:
    """Check one split's arrays: uint8 images of ``image_shape`` per sample, integer labels
    ``(N, num_labels)`` in range, and (if given) ``expected`` samples.

    Raises
    ------
    DataError
        Starting with ``where`` (the file and split) and naming the problem.
    """
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images have dtype {images.dtype}, expected uint8")
    if images.shape[1:] != image_shape:
        raise DataError(f"{where}: images have shape {images.shape[1:]} per sample, expected "
                        f"{image_shape}{shape_note}")
    if labels.ndim != 2 or labels.shape[1] != num_labels:
        raise DataError(f"{where}: labels have shape {labels.shape}, "
                        f"expected (N, {num_labels})")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise DataError(f"{where}: labels have dtype {labels.dtype}, expected integers")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if expected is not None and images.shape[0] != expected:
        raise DataError(f"{where}: {images.shape[0]} samples, expected {expected} "
                        "(the file is not the official one or is incomplete)")
    if labels.size:
        high = 1 if task == "multi-label" else num_classes - 1
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi > high:
            raise DataError(f"{where}: labels range over [{lo}, {hi}], expected [0, {high}]")
