from __future__ import annotations

import math

import pytest
from scipy import stats

from engine.records.results import Results
from engine.records.stats import paired_tests


def test_paired_tests_match_scipy() -> None:
    a = [0.81, 0.72, 0.93, 0.66, 0.75, 0.88, 0.70]
    b = [0.79, 0.70, 0.90, 0.67, 0.71, 0.85, 0.69]
    out = paired_tests(a, b)
    assert out["n"] == 7
    assert out["mean_diff"] == pytest.approx(sum(x - y for x, y in zip(a, b, strict=True)) / 7)
    assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert out["wilcoxon_p_greater"] == pytest.approx(
        stats.wilcoxon(a, b, alternative="greater").pvalue)
    assert out["ttest_p_greater"] == pytest.approx(
        stats.ttest_rel(a, b, alternative="greater").pvalue)
    assert out["win_rate"] == pytest.approx(6 / 7)


def test_degenerate_pairs_give_nan_not_errors() -> None:
    assert math.isnan(paired_tests([0.5], [0.4])["wilcoxon_p"])
    assert math.isnan(paired_tests([0.5, 0.6], [0.5, 0.6])["ttest_p"])
    assert paired_tests([0.5, float("nan"), 0.7], [0.4, 0.3, 0.6])["n"] == 2
    with pytest.raises(ValueError):
        paired_tests([1.0], [1.0, 2.0])


def test_results_table_and_pairs() -> None:
    r = Results()
    for seed, (x, y) in enumerate([(0.8, 0.7), (0.9, 0.6)]):
        r.add("universal+ft", seed, "breast", "breast", {"auc": x})
        r.add("mim", seed, "breast", "breast", {"auc": y})
    r.add("mim", 0, "retina#0", "retina", {"auc": 0.5})
    r.add("mim", 0, "retina#1", "retina", {"auc": 0.7})  # clients of a domain are averaged
    table = r.table("auc")
    assert table["universal+ft"]["breast"] == pytest.approx((0.85, 0.05, 2))
    assert table["mim"]["retina"][0] == pytest.approx(0.6)
    keys, a, b = r.pairs("universal+ft", "mim", "auc")
    assert keys == [("breast", 0), ("breast", 1)] and a == [0.8, 0.9] and b == [0.7, 0.6]
    back = Results.from_parquet_bytes(r.to_parquet_bytes())
    assert back.rows == r.rows
    r.drop("mim")
    assert r.methods() == ["universal+ft"]
