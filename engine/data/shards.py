"""Client and pool shards: unified images written once as Parquet, read back by one owner.

A shard file holds one split of one client (or the server's unlabelled pool):

* ``id`` (string): the sample's identity in its source (``"train/17"``, ``"CXR/000123.jpeg"``);
* ``image`` (fixed-size binary): the unified uint8 ``3 x 28 x 28`` image;
* ``label`` (list of int16, absent from the pool): the label vector.

Schema metadata ``umim`` (JSON) carries the owner, split, task, label names and the
normalisation statistics, so a client needs nothing but its own files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.data.errors import DataError
from engine.data.unify import UNIFIED_SHAPE, to_float_tensor
from engine.records.storage import atomic_path

SHARD_FORMAT_VERSION = 1
_IMAGE_BYTES = int(np.prod(UNIFIED_SHAPE))


@dataclass(frozen=True)
class ShardMeta:
    """What a shard's owner needs to know about it besides the samples."""

    owner: str
    split: str
    task: str
    label_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for the unlabelled pool)."""
        return len(self.label_names)

    def to_json(self) -> str:
        """JSON form stored in the Parquet schema metadata."""
        return json.dumps({"version": SHARD_FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> ShardMeta:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        if data.pop("version", None) != SHARD_FORMAT_VERSION:
            raise DataError("shard format version mismatch: rebuild the shard cache")
        return cls(owner=data["owner"], split=data["split"], task=data["task"],
                   label_names=tuple(data["label_names"]), mean=tuple(data["mean"]),
                   std=tuple(data["std"]))


@dataclass(frozen=True)
class Shard:
    """One split of one owner, in memory.

    Attributes
    ----------
    ids
        Sample identities (``str``), aligned with ``images``.
    images
        uint8 ``(N, 3, 28, 28)`` unified images.
    labels
        int64 ``(N, L)`` labels, or ``None`` for the unlabelled pool.
    meta
        Owner, split, task and normalisation.
    """

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray | None
    meta: ShardMeta

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.shape != (n, *UNIFIED_SHAPE) or self.images.dtype != np.uint8:
            raise DataError(f"shard {self.meta.owner}/{self.meta.split}: images must be uint8 "
                            f"{(n, *UNIFIED_SHAPE)}, got {self.images.dtype} {self.images.shape}")
        if self.labels is not None and (self.labels.ndim != 2 or len(self.labels) != n):
            raise DataError(f"shard {self.meta.owner}/{self.meta.split}: labels must be (N, L) "
                            f"with N={n}, got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: np.ndarray, **meta_changes: Any) -> Shard:
        """The samples at ``indices`` (metadata fields may be replaced by keyword)."""
        return Shard(ids=self.ids[indices], images=self.images[indices],
                     labels=None if self.labels is None else self.labels[indices],
                     meta=replace(self.meta, **meta_changes))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised float32 images and int64 labels, made once for training."""
        x = to_float_tensor(self.images, self.meta.mean, self.meta.std)
        y = None if self.labels is None else torch.from_numpy(self.labels.copy())
        return x, y


def write_shard(path: Path, shard: Shard) -> Path:
    """Write ``shard`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    flat = shard.images.reshape(len(shard), _IMAGE_BYTES)
    columns: dict[str, pa.Array] = {
        "id": pa.array(shard.ids.astype(str), type=pa.string()),
        "image": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(_IMAGE_BYTES), len(shard), [None, pa.py_buffer(flat.tobytes())]),
    }
    if shard.labels is not None:
        width = shard.labels.shape[1]
        values = pa.array(shard.labels.astype(np.int16).ravel(), type=pa.int16())
        columns["label"] = pa.FixedSizeListArray.from_arrays(values, width)
    table = pa.table(columns).replace_schema_metadata({"umim": shard.meta.to_json()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_shard(path: Path) -> Shard:
    """Read a shard written by :func:`write_shard`."""
    path = Path(path)
    try:  # shards are small (a client's split): no read-ahead, no thread pool
        table = pq.read_table(path, use_threads=False, pre_buffer=False)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"shard {path} cannot be read ({err}); delete it to have it rebuilt"
                        ) from err
    raw_meta = (table.schema.metadata or {}).get(b"umim")
    if raw_meta is None or "image" not in table.column_names or "id" not in table.column_names:
        raise DataError(f"{path} is not a umim shard (no 'umim' metadata or columns)")
    meta = ShardMeta.from_json(raw_meta.decode())
    n = table.num_rows
    image_col = table.column("image").combine_chunks()
    images = np.zeros(0, dtype=np.uint8) if n == 0 else np.frombuffer(
        image_col.buffers()[1], dtype=np.uint8, count=n * _IMAGE_BYTES,
        offset=image_col.offset * _IMAGE_BYTES)
    labels = None
    if "label" in table.column_names:
        label_col = table.column("label").combine_chunks()
        width = label_col.type.list_size
        labels = label_col.flatten().to_numpy().astype(np.int64).reshape(n, width)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    return Shard(ids=ids, images=images.reshape(n, *UNIFIED_SHAPE).copy(), labels=labels,
                 meta=meta)


def read_shard_ids(path: Path) -> np.ndarray:
    """Just the ``id`` column of a shard written by :func:`write_shard` (no image is read)."""
    path = Path(path)
    try:
        table = pq.read_table(path, columns=["id"])
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"shard {path} cannot be read ({err}); delete it to have it rebuilt"
                        ) from err
    return np.asarray(table.column("id").to_pylist(), dtype=object)
