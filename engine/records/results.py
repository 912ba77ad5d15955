"""The comparison table of a study: one row per method, seed, client, domain, metric and
replicate.

Two kinds of repetition are kept apart:

* a **replicate** is a whole pipeline run again from its own seed (pretraining, federated
  run, evaluations); replicates are independent draws, the unit the statistics are over;
* an evaluation **seed** repeats only the fine-tuning inside one replicate; seeds of one
  replicate share everything upstream, so they are averaged into that replicate's value
  (:meth:`Results.per_unit`), never counted as independent.

A ``results.parquet`` written before replicates existed has no ``replicate`` column; its
rows read back as replicate 0 (the field's default).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import pyarrow as pa

from engine.records.stats import mean_ci
from engine.records.table import LongTable

# The columns follow the fields of Row in order (LongTable checks it), so ``replicate``, the
# newest field, is last: a default-valued field has to follow the others.
SCHEMA = pa.schema([("method", pa.string()), ("seed", pa.int64()), ("client", pa.string()),
                    ("domain", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
                    ("replicate", pa.int64())])

Unit = tuple[str, int]
"""A statistical unit: (domain, replicate)."""


@dataclass(frozen=True)
class Row:
    """One test metric of one method (e.g. ``universal+ft`` with seed 1 on ``breast`` in
    replicate 0)."""

    method: str
    seed: int
    client: str
    domain: str
    metric: str
    value: float
    replicate: int = 0


class Cell(TypedDict):
    """One method's summary on one domain (a plain dict at run time, JSON-ready)."""

    mean: float
    std: float
    n: int
    ci_low: float
    ci_high: float


def cell(values: list[float]) -> Cell:
    """Mean, sample std (ddof=1), count and t-based 95% CI of ``values``.

    Parameters
    ----------
    values
        Independent values (one per replicate, or per evaluation seed of a lone replicate).

    Returns
    -------
    Cell
        ``std``, ``ci_low`` and ``ci_high`` are NaN when there are fewer than two values.
    """
    mean, low, high = mean_ci(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return Cell(mean=mean, std=std, n=len(values), ci_low=low, ci_high=high)


class Results(LongTable[Row]):
    """Rows of test metrics for every method, with Parquet I/O and the aggregations the
    report needs.

    Arrow, Parquet and pandas I/O come from :class:`~engine.records.table.LongTable`, with
    :data:`SCHEMA`.
    """

    row_type = Row
    schema = SCHEMA

    def add(self, method: str, seed: int, client: str, domain: str,
            metrics: Mapping[str, float], replicate: int = 0) -> None:
        """One row per metric (``auc``, ``acc``; others are kept too).

        Parameters
        ----------
        method, seed, client, domain
            What was evaluated: ``seed`` is the evaluation (fine-tuning) seed.
        metrics
            Metric name -> value.
        replicate
            The independent pipeline replicate the rows belong to.
        """
        for metric, value in metrics.items():
            self.rows.append(Row(method, seed, client, domain, metric, float(value),
                                 replicate))

    def drop(self, method: str, replicate: int | None = None) -> None:
        """Forget the rows of ``method`` (before recomputing it): every replicate's, or only
        ``replicate``'s when given."""
        self.rows = [r for r in self.rows if r.method != method
                     or (replicate is not None and r.replicate != replicate)]

    def methods(self) -> list[str]:
        """Method names in first-seen order."""
        return list(dict.fromkeys(r.method for r in self.rows))

    def _client_means(self, method: str, metric: str) -> dict[tuple[str, int, int], float]:
        """(domain, replicate, seed) -> mean over the domain's clients (NaN values left out)."""
        acc: dict[tuple[str, int, int], list[float]] = defaultdict(list)
        for r in self.rows:
            if r.method == method and r.metric == metric and not math.isnan(r.value):
                acc[(r.domain, r.replicate, r.seed)].append(r.value)
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def per_domain_seed(self, method: str, metric: str) -> dict[tuple[str, int], float]:
        """(domain, seed) -> mean over the domain's clients (and over replicates, if any)."""
        acc: dict[tuple[str, int], list[float]] = defaultdict(list)
        for r in self.rows:
            if r.method == method and r.metric == metric and not math.isnan(r.value):
                acc[(r.domain, r.seed)].append(r.value)
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def per_unit(self, method: str, metric: str) -> dict[Unit, float]:
        """(domain, replicate) -> mean over the domain's clients, then over the evaluation
        seeds of the replicate: one value per independent unit."""
        acc: dict[Unit, list[float]] = defaultdict(list)
        for (domain, replicate, _), value in self._client_means(method, metric).items():
            acc[(domain, replicate)].append(value)
        return {k: float(np.mean(v)) for k, v in acc.items()}

    def _domain_values(self, method: str, metric: str) -> dict[str, list[float]]:
        """domain -> the values its cell summarises: one per replicate, or one per
        evaluation seed when the domain has a single replicate."""
        over_seeds: dict[str, list[float]] = defaultdict(list)
        for (domain, _, _), value in self._client_means(method, metric).items():
            over_seeds[domain].append(value)
        over_replicates: dict[str, list[float]] = defaultdict(list)
        for (domain, _), value in self.per_unit(method, metric).items():
            over_replicates[domain].append(value)
        return {d: v if len(v) > 1 else over_seeds[d] for d, v in over_replicates.items()}

    def table(self, metric: str) -> dict[str, dict[str, Cell]]:
        """method -> domain -> :class:`Cell` (``mean``, ``std``, ``n``, ``ci_low``,
        ``ci_high``).

        The values summarised are the per-unit values over replicates
        (:meth:`per_unit`); a domain with only one replicate is summarised over its
        evaluation seeds instead (as before replicates existed). ``std`` has ddof=1; the CI
        is the t-based 95% interval of the mean; both are NaN for fewer than two values.
        """
        return {method: {d: cell(v) for d, v in self._domain_values(method, metric).items()}
                for method in self.methods()}

    def pairs(self, a: str, b: str, metric: str) -> tuple[list[tuple[str, int]], list[float],
                                                            list[float]]:
        """Matched (domain, seed) pairs of two methods and their values."""
        va, vb = self.per_domain_seed(a, metric), self.per_domain_seed(b, metric)
        keys = sorted(set(va) & set(vb))
        return keys, [va[k] for k in keys], [vb[k] for k in keys]

    def unit_pairs(self, a: str, b: str, metric: str) -> tuple[list[Unit], list[float],
                                                                 list[float]]:
        """Matched (domain, replicate) units of two methods and their values.

        Returns
        -------
        keys, values_a, values_b
            The sorted units both methods have, and each method's :meth:`per_unit` value on
            them (same order).
        """
        va, vb = self.per_unit(a, metric), self.per_unit(b, metric)
        keys = sorted(set(va) & set(vb))
        return keys, [va[k] for k in keys], [vb[k] for k in keys]
