"""Statistics of a study over independent units (numpy and scipy only).

Units, and which one each statistic treats as independent:

* An **evaluation seed** repeats only the fine-tuning inside one replicate. Seeds of one
  replicate share the pretrained encoder and the federated model, so they are never
  counted as independent: they are averaged into their replicate's value.
* A **replicate** is a whole pipeline run again from its own seed (pretraining, federated
  run, evaluations). Replicates are independent draws of the training randomness; the
  value of one method on one (domain, replicate) **unit** is the mean over the domain's
  clients and the replicate's evaluation seeds.
* A **domain** is a different dataset. Domains differ far more from each other than
  replicates do, and the claim is about domains in general.

Tests and intervals:

* ``over_domains`` (:func:`compare_units`): :func:`paired_tests` of the per-domain means
  over replicates. Each domain is one independent pair: the conservative test, valid
  whatever the dependence between a domain's replicates, with as many pairs as domains.
* ``over_units``: :func:`paired_tests` over the (domain, replicate) pairs. Valid because
  each replicate is an independent pipeline, so the differences ``a - b`` of the units of
  a domain are independent draws; the inference is conditional on the domains studied
  (pairs of one domain share that domain), more pairs, more power.
* ``ci95``: :func:`hierarchical_bootstrap_ci` of the mean difference, resampling domains
  and then replicates within each domain, so both sources of variation widen it.
* :func:`holm`: Holm-Bonferroni adjustment across the comparisons reported.
* :func:`mean_ci`: the t-based interval of a mean of independent values (a table cell:
  one value per replicate), with the sample standard deviation (ddof=1).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank and paired t-test of ``a`` vs ``b`` (pairs in the same order).

    Returns the number of pairs, the mean and median difference ``a - b``, the fraction of
    pairs where ``a`` wins, and two-sided and one-sided (``a > b``) p-values of both tests
    (NaN where a test is undefined, e.g. fewer than two pairs or all differences zero).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    d = x - y
    out: dict[str, Any] = {"n": len(d),
                           "mean_diff": float(d.mean()) if len(d) else math.nan,
                           "median_diff": float(np.median(d)) if len(d) else math.nan,
                           "win_rate": float((d > 0).mean()) if len(d) else math.nan}
    nan = math.nan
    if len(d) >= 2 and np.any(d != 0):
        out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue)
        out["wilcoxon_p_greater"] = float(stats.wilcoxon(x, y, alternative="greater").pvalue)
    else:
        out["wilcoxon_p"] = out["wilcoxon_p_greater"] = nan
    if len(d) >= 2 and np.std(d) > 0:
        out["ttest_p"] = float(stats.ttest_rel(x, y).pvalue)
        out["ttest_p_greater"] = float(stats.ttest_rel(x, y, alternative="greater").pvalue)
    else:
        out["ttest_p"] = out["ttest_p_greater"] = nan
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-based confidence interval of the mean of independent ``values``.

    Parameters
    ----------
    values
        The values (NaN ones are left out).
    level
        Coverage of the interval.

    Returns
    -------
    mean, low, high
        ``low``/``high`` are ``mean -+ t_{(1+level)/2, n-1} * s / sqrt(n)`` with the sample
        standard deviation ``s`` (ddof=1); NaN for fewer than two values (all three NaN for
        none).
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni step-down adjusted p-values.

    Parameters
    ----------
    pvalues
        Name -> unadjusted p-value of each comparison of the family.

    Returns
    -------
    dict
        Name -> adjusted p: the ``i``-th smallest of the ``m`` finite p-values becomes
        ``max_{j <= i} min(1, (m - j + 1) p_(j))`` (monotone in the raw p, capped at 1).
        NaN (or None) inputs stay NaN and do not count in ``m``.
    """
    finite = {k: float(p) for k, p in pvalues.items() if p is not None and not math.isnan(p)}
    order = sorted(finite, key=finite.__getitem__)
    adjusted, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * finite[name]))
        adjusted[name] = running
    return {k: adjusted.get(k, math.nan) for k in pvalues}


def _padded(diffs: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Finite values of each non-empty domain as rows of a NaN-padded matrix, and counts."""
    rows = [v[~np.isnan(v)] for v in (np.asarray(x, dtype=float) for x in diffs.values())]
    rows = [v for v in rows if len(v)]
    counts = np.array([len(v) for v in rows], dtype=int)
    out = np.full((len(rows), counts.max(initial=0)), np.nan)
    for i, v in enumerate(rows):
        out[i, :len(v)] = v
    return out, counts


def _draws(values: np.ndarray, counts: np.ndarray, n: int,
           rng: np.random.Generator) -> np.ndarray:
    """``n`` two-stage bootstrap statistics: domains with replacement, then each drawn
    domain's replicates with replacement; mean over domains of the replicate means."""
    n_domains, width = values.shape
    dom = rng.integers(0, n_domains, size=(n, n_domains))
    reps = counts[dom]
    idx = rng.integers(0, reps[..., None], size=(n, n_domains, width))
    drawn = values[dom[..., None], idx]
    keep = np.arange(width) < reps[..., None]
    return (np.where(keep, drawn, 0.0).sum(axis=2) / reps).mean(axis=1)


def hierarchical_bootstrap_ci(diffs: Mapping[str, Sequence[float]], *, level: float = 0.95,
                              n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean difference over domains and replicates.

    Parameters
    ----------
    diffs
        Domain -> its per-replicate differences ``a - b`` (NaN values are left out, and
        domains left with none).
    level
        Coverage of the interval.
    n_boot
        Number of bootstrap draws.
    seed
        Seed of the generator (the same seed gives the same interval).

    Returns
    -------
    low, high
        Percentiles of the statistic (mean over drawn domains of the mean of each one's
        drawn replicates) over the draws; NaN when there is no value.
    """
    values, counts = _padded(diffs)
    if len(counts) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // values.size)  # bounds the memory of one batch of draws
    boot = np.concatenate([_draws(values, counts, min(chunk, n_boot - start), rng)
                           for start in range(0, n_boot, chunk)])
    low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _matched(a: Mapping[tuple[str, int], float],
             b: Mapping[tuple[str, int], float]) -> list[tuple[str, int]]:
    """Sorted units both mappings hold with finite values."""
    return sorted(k for k in set(a) & set(b)
                  if not (math.isnan(a[k]) or math.isnan(b[k])))


def compare_units(a: Mapping[tuple[str, int], float], b: Mapping[tuple[str, int], float], *,
                  n_boot: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Compare two methods over matched (domain, replicate) units.

    Parameters
    ----------
    a, b
        (domain, replicate) -> value of each method (e.g.
        :meth:`engine.records.results.Results.per_unit`); only units both have, with
        finite values, count.
    n_boot, seed
        Draws and seed of the hierarchical bootstrap.

    Returns
    -------
    dict
        JSON-ready: ``n_domains``, ``n_replicates`` (distinct replicates), ``units``
        (``[domain, replicate]`` lists), ``mean_diff`` (mean over domains of the mean over
        replicates of ``a - b``), ``ci95`` (``[low, high]``, hierarchical bootstrap),
        ``over_domains`` (:func:`paired_tests` of the per-domain means), ``over_units``
        (:func:`paired_tests` over the units) and ``win_rate_domains`` (fraction of domains
        whose mean difference is positive).
    """
    keys = _matched(a, b)
    by_domain: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for k in keys:
        by_domain[k[0]].append((a[k], b[k]))
    dom_a = [float(np.mean([x for x, _ in v])) for v in by_domain.values()]
    dom_b = [float(np.mean([y for _, y in v])) for v in by_domain.values()]
    dom_diff = np.subtract(dom_a, dom_b)
    low, high = hierarchical_bootstrap_ci(
        {d: [x - y for x, y in v] for d, v in by_domain.items()}, n_boot=n_boot, seed=seed)
    return {"n_domains": len(by_domain),
            "n_replicates": len({k[1] for k in keys}),
            "units": [[d, int(r)] for d, r in keys],
            "mean_diff": float(dom_diff.mean()) if len(keys) else math.nan,
            "ci95": [low, high],
            "over_domains": paired_tests(dom_a, dom_b),
            "over_units": paired_tests([a[k] for k in keys], [b[k] for k in keys]),
            "win_rate_domains": float((dom_diff > 0).mean()) if len(keys) else math.nan}
