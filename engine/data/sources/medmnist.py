"""The ``medmnist`` source: an official MedMNIST v2 / MedMNIST+ ``.npz`` (any flag, any size).

Entry keys: ``dataset`` (a flag of ``medmnist.INFO`` or ``pathmnist_subset``) and ``size``
(default 28). Task and label names come from ``medmnist.INFO``; a missing file is
downloaded when the builder may download.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.data.errors import DataError
from engine.data.medmnist import load_medmnist, medmnist_spec, read_label_counts
from engine.data.sources.base import (
    RawSplit,
    Source,
    SourceContext,
    check_keys,
    common_fields,
    file_fingerprint,
)
from engine.data.spec import DomainSpec


class MedMNISTSource(Source):
    """Reads ``<data_root>/medmnist/<flag>[_<size>].npz``."""

    def parse(self, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Check ``dataset`` / ``size`` against ``medmnist.INFO`` (no file is read)."""
        check_keys(name, entry, {"dataset", "size"})
        if "dataset" not in entry:
            raise ValueError(f"domain {name!r}: a medmnist domain needs 'dataset' "
                             "(a MedMNIST flag such as 'breastmnist')")
        try:
            size = int(entry.get("size", 28))
        except (TypeError, ValueError):
            raise ValueError(f"domain {name!r}: key 'size' must be an integer, "
                             f"got {entry['size']!r}") from None
        try:
            spec = medmnist_spec(str(entry["dataset"]), size)
        except DataError as err:
            key = "size" if "has no size" in str(err) else "dataset"
            raise ValueError(f"domain {name!r}: key {key!r}: {err}") from err
        return DomainSpec(dataset=spec.flag, size=spec.size, task=spec.task,
                          label_names=spec.label_names, **common_fields(name, entry))

    def fingerprint(self, spec: DomainSpec, ctx: SourceContext) -> object:
        """Name, size and mtime of the ``.npz`` (``None`` while it is missing)."""
        path = medmnist_spec(spec.dataset or "", spec.size).path(ctx.data_root)
        return file_fingerprint(path) if path.exists() else None

    def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
        """The validated splits (downloading the file first if allowed and missing)."""
        mspec = medmnist_spec(spec.dataset or "", spec.size)
        data = load_medmnist(mspec.flag, mspec.size, ctx.data_root, download=ctx.download)
        return {s: RawSplit(a.images, a.labels,
                            np.asarray([f"{s}/{i}" for i in range(len(a))], dtype=object),
                            mspec.spatial_dims, mspec.in_channels) for s, a in data.items()}

    def count(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, int]:
        """Counts from the label arrays only."""
        return read_label_counts(spec.dataset or "", spec.size, ctx.data_root)

    def describe(self, spec: DomainSpec) -> str:
        """``"<flag>@<size>"``."""
        return f"{spec.dataset}@{spec.size}"
