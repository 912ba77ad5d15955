"""The ``npz`` source: a private ``.npz`` in the MedMNIST layout, under a name of one's own.

The file holds ``train_images``, ``train_labels``, ``val_images``, ... like an official
MedMNIST file. Entry keys:

``path``
    The file, relative to the data root unless absolute (required; nothing is downloaded).
``label_names``
    Class names in label order; for ``multi-label`` one name per label column (required).
``task``
    ``binary``, ``multi-class``, ``ordinal`` or ``multi-label`` (required).
``spatial_dims``
    2 or 3 (optional). Else inferred from the train images: ``(N, S, S)`` grey 2D,
    ``(N, S, S, 3)`` RGB 2D (``(N, S, S, 1)`` is read as grey), ``(N, S, S, S)`` a 3D volume.

Images must be uint8 and square (cubic in 3D), of one shape in every split; labels are
integers ``(N, 1)`` (or ``(N,)``), ``(N, L)`` for multi-label, in range.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.errors import DataError
from engine.data.medmnist import (
    SPLITS,
    check_npz_keys,
    open_npz,
    read_npz_array,
    validate_split_arrays,
)
from engine.data.sources.base import (
    RawSplit,
    Source,
    SourceContext,
    check_keys,
    common_fields,
    existing_path,
    file_fingerprint,
    parse_label_names,
    parse_path,
    parse_task,
    resolve_path,
)
from engine.data.spec import DomainSpec

_HINT = "check how the file was written"
_KEYS_HINT = "A umim npz file holds {train,val,test}_{images,labels}, as MedMNIST files do"


def _geometry(path: Path, shape: tuple[int, ...], spatial_dims: int | None
              ) -> tuple[int, int, bool]:
    """``(spatial_dims, in_channels, squeeze_last)`` of images of ``shape`` (with ``N``)."""
    per = shape[1:]
    if spatial_dims != 3 and len(per) == 3 and per[-1] in (1, 3) and per[0] == per[1]:
        return 2, per[-1], per[-1] == 1
    if spatial_dims != 3 and len(per) == 2 and per[0] == per[1]:
        return 2, 1, False
    if spatial_dims != 2 and len(per) == 3 and len(set(per)) == 1:
        return 3, 1, False
    wanted = {2: "(N, S, S) grey or (N, S, S, 3) RGB", 3: "(N, S, S, S) volumes",
              None: "(N, S, S) grey, (N, S, S, 3) RGB or (N, S, S, S) volumes"}[spatial_dims]
    raise DataError(f"{path} [train]: images have shape {shape}; expected {wanted} "
                    "(square images, cubic volumes)")


class NpzSource(Source):
    """A user's own MedMNIST-layout ``.npz`` file."""

    def parse(self, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Check ``path``, ``label_names``, ``task`` and ``spatial_dims`` (no file is read)."""
        check_keys(name, entry, {"path", "label_names", "task", "spatial_dims"},
                   required=("path", "label_names", "task"))
        task = parse_task(name, entry["task"])
        labels = parse_label_names(name, entry["label_names"],
                                   minimum=1 if task == "multi-label" else 2)
        if task == "binary" and len(labels) != 2:
            raise ValueError(f"domain {name!r}: a binary task needs exactly 2 'label_names', "
                             f"got {list(labels)}")
        options: dict[str, Any] = {}
        if "spatial_dims" in entry:
            if entry["spatial_dims"] not in (2, 3):
                raise ValueError(f"domain {name!r}: key 'spatial_dims' must be 2 or 3, got "
                                 f"{entry['spatial_dims']!r}")
            options["spatial_dims"] = int(entry["spatial_dims"])
        return DomainSpec(task=task, label_names=labels, path=parse_path(name, entry["path"]),
                          options=options, **common_fields(name, entry))

    def fingerprint(self, spec: DomainSpec, ctx: SourceContext) -> object:
        """Name, size and mtime of the file (``None`` while it is missing)."""
        path = resolve_path(spec, ctx.data_root)
        return file_fingerprint(path) if path.is_file() else None

    def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
        """The validated splits."""
        path = existing_path(spec, ctx.data_root, "npz file")
        out: dict[str, RawSplit] = {}
        with open_npz(path, _HINT) as npz:
            check_npz_keys(npz, path, SPLITS, _KEYS_HINT)
            train = read_npz_array(npz, "train_images", path, _HINT)
            dims, channels, squeeze = _geometry(path, train.shape,
                                                spec.options.get("spatial_dims"))
            for split in SPLITS:
                images = train if split == "train" else read_npz_array(
                    npz, f"{split}_images", path, _HINT)
                labels = read_npz_array(npz, f"{split}_labels", path, _HINT)
                if labels.ndim == 1 and spec.num_labels == 1:
                    labels = labels[:, None]
                validate_split_arrays(f"{path} [{split}]", images, labels,
                                      image_shape=train.shape[1:], num_labels=spec.num_labels,
                                      num_classes=spec.num_classes, task=spec.task,
                                      shape_note=" (the shape of the train images)")
                if squeeze:
                    images = images[..., 0]
                ids = np.asarray([f"{split}/{i}" for i in range(len(images))], dtype=object)
                out[split] = RawSplit(images, labels.astype(np.int64), ids, dims, channels)
        if not len(out["train"].labels):
            raise DataError(f"{path}: the train split is empty")
        return out

    def count(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, int]:
        """Counts from the label arrays only."""
        path = existing_path(spec, ctx.data_root, "npz file")
        with open_npz(path, _HINT) as npz:
            check_npz_keys(npz, path, SPLITS, _KEYS_HINT)
            return {s: int(read_npz_array(npz, f"{s}_labels", path, _HINT).shape[0])
                    for s in SPLITS}

    def describe(self, spec: DomainSpec) -> str:
        """``"npz:<file name>"``."""
        return f"npz:{Path(spec.path or '').name}"
