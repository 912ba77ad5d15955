"""Per-domain sample counts for ``umim data list``, read without building any shard."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.data.catalog import DomainSpec
from engine.data.errors import DataError
from engine.data.medmnist import SPLITS, read_label_counts
from engine.data.mednist import MEDNIST_CLASSES, list_mednist, split_mednist
from engine.data.prepare import MedNISTSplitSettings


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
    """Count train / val / test samples of every domain in ``catalog``, and the pool."""
    mednist_counts: dict[str, dict[str, int]] = {}
    mednist_problem: str | None = None
    if any(spec.source == "mednist" for spec in catalog.values()):
        try:
            mednist_counts = _mednist_counts(catalog, data_root,
                                             mednist or MedNISTSplitSettings())
        except DataError as err:
            mednist_problem = str(err)
    rows: list[DomainSummary] = []
    for spec in catalog.values():
        if spec.source == "mednist":
            rows.append(DomainSummary(spec, mednist_counts.get(spec.name, {}), mednist_problem))
            continue
        try:
            rows.append(DomainSummary(spec, read_label_counts(spec.dataset or "", spec.size,
                                                              data_root)))
        except DataError as err:
            rows.append(DomainSummary(spec, {}, str(err)))
    pool = mednist_counts.get("_pool", {}).get("pool")
    return DataSummary(rows, pool)


def _mednist_counts(catalog: Mapping[str, DomainSpec], data_root: Path,
                    settings: MedNISTSplitSettings) -> dict[str, dict[str, int]]:
    _, labels = list_mednist(data_root)
    claims = {n: [MEDNIST_CLASSES.index(c) for c in s.classes]
              for n, s in catalog.items() if s.source == "mednist"}
    split = split_mednist(labels, claims, seed=settings.seed,
                          pool_fraction=settings.pool_fraction,
                          split_fractions=settings.split_fractions)
    counts = {name: {s: len(idx) for s, idx in parts.items()}
              for name, parts in split.domains.items()}
    counts["_pool"] = {"pool": len(split.pool)}
    return counts
