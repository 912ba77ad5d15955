"""The comparison table of a study: one row per method, seed, client, domain and metric."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.records.table import LongTable

SCHEMA = pa.schema([("method", pa.string()), ("seed", pa.int64()), ("client", pa.string()),
                    ("domain", pa.string()), ("metric", pa.string()), ("value", pa.float64())])


@dataclass(frozen=True)
class Row:
    """One test metric of one method (e.g. ``universal+ft`` with seed 1 on ``breast``)."""

    method: str
    seed: int
    client: str
    domain: str
    metric: str
    value: float


class Results(LongTable[Row]):
    """Rows of test metrics for every method, with Parquet I/O and the aggregations the
    report needs.

    Arrow, Parquet and pandas I/O come from :class:`~engine.records.table.LongTable`, with
    :data:`SCHEMA`.
    """

    row_type = Row
    schema = SCHEMA

    def add(self, method: str, seed: int, client: str, domain: str,
            metrics: Mapping[str, float]) -> None:
        """One row per metric (``auc``, ``acc``; others are kept too)."""
        for metric, value in metrics.items():
            self.rows.append(Row(method, seed, client, domain, metric, float(value)))

    def drop(self, method: str) -> None:
        """Forget every row of ``method`` (before recomputing it)."""
        self.rows = [r for r in self.rows if r.method != method]

    def methods(self) -> list[str]:
        """Method names in first-seen order."""
        return list(dict.fromkeys(r.method for r in self.rows))

    def per_domain_seed(self, method: str, metric: str) -> dict[tuple[str, int], float]:
        """(domain, seed) -> mean over the domain's clients."""
        acc: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in self.rows:
            if r.method == method and r.metric == metric and not math.isnan(r.value):
                acc[(r.domain, r.seed)].append(r.value)
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def table(self, metric: str) -> dict[str, dict[str, tuple[float, float, int]]]:
        """method -> domain -> (mean, std, n) over seeds of the per-domain value."""
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for method in self.methods():
            by_domain: dict[str, list[float]] = defaultdict(list)
            for (domain, _), value in self.per_domain_seed(method, metric).items():
                by_domain[domain].append(value)
            out[method] = {d: (float(np.mean(v)), float(np.std(v)), len(v))
                           for d, v in by_domain.items()}
        return out

    def pairs(self, a: str, b: str, metric: str) -> tuple[list[tuple[str, int]], list[float],
                                                            list[float]]:
        """Matched (domain, seed) pairs of two methods and their values."""
        va, vb = self.per_domain_seed(a, metric), self.per_domain_seed(b, metric)
        keys = sorted(set(va) & set(vb))
        return keys, [va[k] for k in keys], [vb[k] for k in keys]
