"""Paired significance tests between two methods (scipy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
