from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from engine.records.results import SCHEMA, Results, Row
from engine.records.stats import (
    compare_units,
    hierarchical_bootstrap_ci,
    holm,
    mean_ci,
    paired_tests,
)


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
    cell = table["universal+ft"]["breast"]  # one replicate: over its evaluation seeds
    assert cell["mean"] == pytest.approx(0.85) and cell["n"] == 2
    assert cell["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert table["mim"]["retina"]["mean"] == pytest.approx(0.6)
    assert table["mim"]["retina"]["n"] == 1 and math.isnan(table["mim"]["retina"]["std"])
    assert math.isnan(table["mim"]["retina"]["ci_low"])
    keys, a, b = r.pairs("universal+ft", "mim", "auc")
    assert keys == [("breast", 0), ("breast", 1)] and a == [0.8, 0.9] and b == [0.7, 0.6]
    back = Results.from_parquet_bytes(r.to_parquet_bytes())
    assert back.rows == r.rows
    r.drop("mim")
    assert r.methods() == ["universal+ft"]


# -- mean_ci and holm ------------------------------------------------------------------------
def test_mean_ci_is_the_t_interval_with_ddof_1() -> None:
    mean, low, high = mean_ci([0.6, 0.7, 0.8])
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)  # sample std of 0.6, 0.7, 0.8 is 0.1
    assert mean == pytest.approx(0.7)
    assert (low, high) == pytest.approx((0.7 - half, 0.7 + half))
    assert (low, high) == pytest.approx((0.45159, 0.94841), abs=1e-5)
    assert mean_ci([0.6, 0.7, 0.8], level=0.5)[2] - 0.7 < half
    one = mean_ci([0.6, float("nan")])
    assert one[0] == 0.6 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(x) for x in mean_ci([]))


def test_holm_matches_a_hand_computed_example() -> None:
    out = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x -> 0.02, 0.03, 0.06, 0.04 -> monotone
    assert out == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert list(out) == ["a", "b", "c", "d"]


def test_holm_caps_at_one_and_leaves_nan_out_of_the_family() -> None:
    out = holm({"x": 0.4, "y": float("nan"), "z": 0.02, "w": None})  # type: ignore[dict-item]
    assert out["z"] == pytest.approx(0.04) and out["x"] == pytest.approx(0.4)
    assert math.isnan(out["y"]) and math.isnan(out["w"])
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}


# -- the hierarchical bootstrap ---------------------------------------------------------------
def _diffs(shift: float, noise: float, seed: int = 0, domains: int = 8,
           replicates: int = 5) -> dict[str, list[float]]:
    """Per-replicate differences: shift + a domain effect + replicate noise."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0, 0.01, domains)
    return {f"d{i}": list(shift + effects[i] + rng.normal(0, noise, replicates))
            for i in range(domains)}


def test_bootstrap_excludes_zero_for_a_clear_effect_and_includes_it_for_none() -> None:
    low, high = hierarchical_bootstrap_ci(_diffs(0.05, 0.01))
    assert 0 < low < 0.05 < high
    low, high = hierarchical_bootstrap_ci(_diffs(0.0, 0.01))
    assert low < 0 < high


def test_bootstrap_covers_the_true_mean_of_a_synthetic_shift() -> None:
    covered = [lo <= 0.03 <= hi for lo, hi in
               (hierarchical_bootstrap_ci(_diffs(0.03, 0.02, seed=s), n_boot=2000, seed=s)
                for s in range(200))]
    assert np.mean(covered) >= 0.85  # nominal 0.95; a percentile CI over 8 domains is a bit
    # narrow


def test_bootstrap_is_reproducible_and_widens_with_replicate_noise() -> None:
    d = _diffs(0.02, 0.01)
    assert hierarchical_bootstrap_ci(d, seed=3) == hierarchical_bootstrap_ci(d, seed=3)
    assert hierarchical_bootstrap_ci(d, seed=3) != hierarchical_bootstrap_ci(d, seed=4)
    widths = [np.subtract(*hierarchical_bootstrap_ci(_diffs(0.02, noise))[::-1])
              for noise in (0.001, 0.02, 0.1)]
    assert widths[0] < widths[1] < widths[2]


def test_bootstrap_handles_uneven_replicates_nan_and_nothing() -> None:
    low, high = hierarchical_bootstrap_ci({"a": [0.1, 0.2, float("nan")], "b": [0.3],
                                           "c": [float("nan")]})
    assert 0.1 <= low <= high <= 0.3  # bounded by the values; "c" dropped
    assert hierarchical_bootstrap_ci({"a": [0.2]}) == pytest.approx((0.2, 0.2))
    assert all(math.isnan(x) for x in hierarchical_bootstrap_ci({}))
    assert all(math.isnan(x) for x in hierarchical_bootstrap_ci({"a": []}))


def test_bootstrap_of_10k_draws_is_fast() -> None:
    d = _diffs(0.02, 0.01)
    start = time.perf_counter()
    hierarchical_bootstrap_ci(d, n_boot=10000)
    assert time.perf_counter() - start < 0.5


# -- compare_units ---------------------------------------------------------------------------
def test_compare_units_on_a_hand_example() -> None:
    a = {("x", 0): 0.8, ("x", 1): 0.9, ("x", 2): 1.0, ("y", 0): 0.6, ("y", 1): 0.7,
         ("z", 0): 0.9}
    b = {("x", 0): 0.7, ("x", 1): 0.7, ("x", 2): 0.7, ("y", 0): 0.65, ("y", 1): 0.6,
         ("w", 0): 0.1, ("y", 2): float("nan")}
    out = compare_units(a, b, n_boot=2000)
    # x: 0.1, 0.2, 0.3 -> 0.2; y: -0.05, 0.1 -> 0.025; z, w unmatched, (y, 2) NaN
    assert out["n_domains"] == 2 and out["n_replicates"] == 3
    assert out["units"] == [["x", 0], ["x", 1], ["x", 2], ["y", 0], ["y", 1]]
    assert out["mean_diff"] == pytest.approx(0.1125)
    assert out["win_rate_domains"] == 1.0
    assert out["over_domains"] == pytest.approx(paired_tests([0.9, 0.65], [0.7, 0.625]))
    assert out["over_units"] == pytest.approx(paired_tests([0.8, 0.9, 1.0, 0.6, 0.7],
                                                           [0.7, 0.7, 0.7, 0.65, 0.6]))
    assert out["over_units"]["mean_diff"] == pytest.approx(0.13)  # not the domain mean
    low, high = out["ci95"]
    assert -0.05 <= low <= 0.1125 <= high <= 0.3
    assert json.loads(json.dumps(out))["ci95"] == [low, high]


def test_compare_units_with_nothing_matched() -> None:
    out = compare_units({("x", 0): 0.5}, {("y", 0): 0.5})
    assert out["n_domains"] == 0 and out["n_replicates"] == 0 and out["units"] == []
    assert math.isnan(out["mean_diff"]) and math.isnan(out["win_rate_domains"])
    assert all(math.isnan(x) for x in out["ci95"]) and out["over_units"]["n"] == 0


# -- Results with replicates -----------------------------------------------------------------
def _replicated() -> Results:
    r = Results()
    for rep, (x, y) in enumerate([(0.6, 0.55), (0.7, 0.6), (0.8, 0.65)]):
        for seed, jitter in ((0, -0.01), (1, 0.01)):  # seeds average into the replicate
            r.add("fl+ft", seed, "breast#0", "breast", {"auc": x + jitter - 0.02},
                  replicate=rep)
            r.add("fl+ft", seed, "breast#1", "breast", {"auc": x + jitter + 0.02},
                  replicate=rep)
            r.add("mim", seed, "breast#0", "breast", {"auc": y + jitter}, replicate=rep)
    r.add("mim", 0, "retina", "retina", {"auc": 0.7}, replicate=0)
    return r


def test_per_unit_averages_clients_and_seeds_within_a_replicate() -> None:
    units = _replicated().per_unit("fl+ft", "auc")
    assert units == pytest.approx({("breast", 0): 0.6, ("breast", 1): 0.7,
                                   ("breast", 2): 0.8})
    keys, a, b = _replicated().unit_pairs("fl+ft", "mim", "auc")
    assert keys == [("breast", 0), ("breast", 1), ("breast", 2)]
    assert a == pytest.approx([0.6, 0.7, 0.8]) and b == pytest.approx([0.55, 0.6, 0.65])


def test_table_is_over_replicates_with_a_t_interval() -> None:
    table = _replicated().table("auc")
    cell = table["fl+ft"]["breast"]
    assert set(cell) == {"mean", "std", "n", "ci_low", "ci_high"}
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(0.7)
    assert cell["std"] == pytest.approx(0.1)
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx((0.7 - half, 0.7 + half))
    assert table["mim"]["retina"]["n"] == 1 and math.isnan(table["mim"]["retina"]["ci_high"])
    assert json.loads(json.dumps(table))["fl+ft"]["breast"]["n"] == 3


def test_drop_one_replicate_or_all() -> None:
    r = _replicated()
    r.drop("fl+ft", replicate=1)
    assert sorted(r.per_unit("fl+ft", "auc")) == [("breast", 0), ("breast", 2)]
    assert len(r.per_unit("mim", "auc")) == 4
    r.drop("fl+ft")
    assert r.methods() == ["mim"]


def test_replicate_round_trips_through_parquet() -> None:
    r = _replicated()
    data = r.to_parquet_bytes()
    assert pq.read_table(io.BytesIO(data)).schema == SCHEMA
    assert "replicate" in SCHEMA.names and SCHEMA.field("replicate").type == pa.int64()
    back = Results.from_parquet_bytes(data)
    assert back.rows == r.rows and {x.replicate for x in back.rows} == {0, 1, 2}
    assert all(type(x.replicate) is int for x in back.rows)
    assert Row("m", 0, "c", "d", "auc", 0.5).replicate == 0  # old positional rows still build


def test_a_results_file_without_the_replicate_column_reads_as_replicate_0() -> None:
    old = pa.schema([f for f in SCHEMA if f.name != "replicate"])
    table = pa.table({"method": ["mim", "mim"], "seed": [0, 1], "client": ["a", "a"],
                      "domain": ["breast", "breast"], "metric": ["auc", "auc"],
                      "value": [0.7, 0.8]}, schema=old)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    back = Results.from_parquet_bytes(sink.getvalue())
    assert back.rows == [Row("mim", 0, "a", "breast", "auc", 0.7, 0),
                         Row("mim", 1, "a", "breast", "auc", 0.8, 0)]
    assert back.per_unit("mim", "auc") == pytest.approx({("breast", 0): 0.75})
    assert back.table("auc")["mim"]["breast"]["n"] == 2  # one replicate: over seeds
    assert pq.read_table(io.BytesIO(back.to_parquet_bytes())).schema == SCHEMA
