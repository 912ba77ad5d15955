"""Per-domain sample counts for ``umim data list``, read without building any shard.

Every domain is counted by its own :class:`~engine.data.sources.Source`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.data.errors import DataError
from engine.data.medmnist import SPLITS
from engine.data.mednist import MedNISTSplitSettings
from engine.data.sources import SourceContext, get_source
from engine.data.sources.mednist import pool_size
from engine.data.spec import DomainSpec


@dataclass(frozen=True)
class DomainSummary:
    """One row of the domain table; ``counts`` is empty and ``problem`` set when unreadable."""

    spec: DomainSpec
    counts: dict[str, int]
    problem: str | None = None

    def to_dict(self) -> dict:
        """JSON form: the domain's metadata with ``train`` / ``val`` / ``test`` counts."""
        out = {
            "source": self.spec.source_name,
            "modality": self.spec.modality,
            "task": self.spec.task,
            "num_classes": self.spec.num_classes,
            "label_names": list(self.spec.label_names),
            **{s: self.counts.get(s) for s in SPLITS},
        }
        if self.problem:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class DataSummary:
    """Every domain's row, and the size of the server's unlabelled pool (``None`` if unknown)."""

    domains: list[DomainSummary]
    pool_size: int | None

    @property
    def ok(self) -> bool:
        """True when every domain's files were found and read."""
        return not any(r.problem for r in self.domains)


def summarise_domains(catalog: Mapping[str, DomainSpec], data_root: Path,
                      mednist: MedNISTSplitSettings | None = None) -> DataSummary:
    """Count train / val / test samples of every domain in ``catalog``, and the pool.

    Each domain's source counts its own samples (reading file lists and label arrays, not
    images); a missing or unreadable input is that row's ``problem``, never an exception.
    A row's spec is the source's resolved one (e.g. a folder's class names) when readable.
    """
    ctx = SourceContext(catalog, Path(data_root), download=False,
                        mednist=mednist or MedNISTSplitSettings())
    rows: list[DomainSummary] = []
    for spec in catalog.values():
        source = get_source(spec.source)
        try:
            resolved = source.resolve(spec, ctx)
            rows.append(DomainSummary(resolved, source.count(resolved, ctx)))
        except DataError as err:
            rows.append(DomainSummary(spec, {}, str(err)))
    return DataSummary(rows, pool_size(ctx))
