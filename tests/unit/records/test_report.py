"""report.md from summaries in the replicate format (CIs, Holm p, units) and the old one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from engine.records.report import PLOT_AUC, write_report
from engine.records.storage import Storage


def _cell(mean: float, low: float, high: float, n: int = 3) -> dict[str, float]:
    return {"mean": mean, "std": 0.05, "n": n, "ci_low": low, "ci_high": high}


def _tests(n: int, diff: float, p: float) -> dict[str, float]:
    return {"n": n, "mean_diff": diff, "median_diff": diff, "win_rate": 0.75,
            "wilcoxon_p": 2 * p, "wilcoxon_p_greater": p, "ttest_p": 2 * p,
            "ttest_p_greater": p / 2}


def _base(**extra: Any) -> dict[str, Any]:
    return {"name": "study", "strategy": "universal", "rounds": 2, "seed": 0,
            "domains": ["breast", "retina"], **extra}


NEW = _base(
    methods={"universal+ft": {"breast": {"auc": _cell(0.812, 0.75, 0.874),
                                         "acc": _cell(0.7, 0.6, 0.8)},
                              "retina": {"auc": _cell(0.7, math.nan, math.nan, n=1)}},
             "mim+ft": {"breast": {"auc": _cell(0.79, 0.7, 0.88)}}},
    comparisons=[{"a": "universal+ft", "b": "mim+ft", "kind": "downstream",
                  "mode": "finetune", "metric": "auc", "mean_diff": 0.0215,
                  "ci95": [0.0042, 0.0391], "n_domains": 2, "n_replicates": 3,
                  "over_domains": _tests(2, 0.0215, 0.25),
                  "over_units": _tests(6, 0.0215, 0.0156), "holm_p": 0.0312,
                  "primary": True},
                 {"a": "universal+ft", "b": "mim+ft", "kind": "downstream",
                  "mode": "finetune", "metric": "acc", "mean_diff": -0.01,
                  "ci95": [math.nan, math.nan], "n_domains": 1, "n_replicates": 3,
                  "over_domains": _tests(1, -0.01, math.nan),
                  "over_units": _tests(3, -0.01, 0.6), "holm_p": None,
                  "primary": False}],
    claim={"comparison": "universal+ft > mim+ft (AUC)", "mode": "finetune",
           "mean_diff": 0.0215, "ci95": [0.0042, 0.0391], "p": 0.0156, "holm_p": 0.0312,
           "test": "one-sided Wilcoxon over (domain, replicate) units", "held": True})

OLD = _base(
    methods={"universal+ft": {"breast": {"auc": {"mean": 0.81, "std": 0.02, "n": 2}}},
             "mim+ft": {"breast": {"auc": {"mean": 0.77, "std": 0.03, "n": 2}}}},
    comparisons=[{"a": "universal+ft", "b": "mim+ft", "kind": "downstream", "metric": "auc",
                  "pairs": [["breast", 0], ["breast", 1]], **_tests(2, 0.04, 0.25)}],
    claim={"comparison": "universal+ft > mim+ft (AUC)", "mean_diff": 0.04,
           "wilcoxon_p_greater": 0.25, "held": False})


def _render(tmp_path: Path, summary: dict[str, Any]) -> str:
    storage = Storage(tmp_path)
    storage.write_text("summary.json", json.dumps(summary))
    path = write_report(str(tmp_path))
    assert storage.exists(PLOT_AUC)
    return Path(path).read_text()


def test_new_summary_shows_cis_units_holm_p_and_the_verdict(tmp_path: Path) -> None:
    text = _render(tmp_path, NEW)
    assert "(mean [95% CI] over replicates)" in text
    assert "| universal+ft | 0.812 [0.750, 0.874] | 0.700 | 0.756 |" in text  # n=1: mean only
    assert "| mim+ft | 0.790 [0.700, 0.880] | – | 0.790 |" in text
    assert "± " not in text
    primary = next(x for x in text.splitlines() if x.startswith("| universal+ft vs mim+ft")
                   and "| auc |" in x)
    assert "domains (mean over replicates) | 2 | +0.0215 | [+0.0042, +0.0391]" in primary
    assert primary.endswith("| 0.0312 | yes |")
    assert "| ″ | ″ | (domain, replicate) units | 6 | | | 0.75 | 0.0312 | 0.0156 |" in text
    acc = next(x for x in text.splitlines() if "| acc | domains" in x)
    assert "| -0.0100 | – |" in acc and acc.endswith("| – |  |")
    assert "Holm" in text and "hierarchical bootstrap" in text
    assert "Pre-registered primary comparison: universal+ft > mim+ft (AUC) (finetune)." in text
    assert ("Mean AUC difference +0.0215, 95% CI [+0.0042, +0.0391]; one-sided Wilcoxon over "
            "(domain, replicate) units: one-sided p = 0.0156, Holm-adjusted p = 0.0312. "
            "The claim **held** on this run.") in text


def test_old_summary_still_renders(tmp_path: Path) -> None:
    text = _render(tmp_path, OLD)
    assert "| universal+ft | 0.810 | – | 0.810 |" in text  # no CI keys: the mean only
    assert ("| universal+ft vs mim+ft | auc | (domain, seed) pairs | 2 | +0.0400 | – | 0.75 | "
            "0.5 | 0.25 | 0.5 | 0.125 | – | – |") in text
    assert "Pre-registered primary comparison: universal+ft > mim+ft (AUC)." in text
    assert "one-sided Wilcoxon p = 0.25. At p < 0.05 the claim **did NOT hold**" in text


def test_the_auc_plot_has_ci_error_bars_and_a_chance_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    seen: dict[str, Any] = {}
    bar, axhline = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.axhline

    def spy_bar(self: Any, x: Any, height: Any, *args: Any, **kwargs: Any) -> Any:
        seen.setdefault("yerr", []).append(kwargs["yerr"])
        return bar(self, x, height, *args, **kwargs)

    def spy_line(self: Any, y: float, *args: Any, **kwargs: Any) -> Any:
        seen["line"] = (y, kwargs.get("linestyle"), kwargs.get("label"))
        return axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy_bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy_line)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda self, *a, **k: seen.__setitem__("ylim", a))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, t, *a, **k: seen.__setitem__("title", t))
    _render(tmp_path, NEW)
    low, high = seen["yerr"][0]  # universal+ft: breast with a CI, retina without
    assert low == pytest.approx([0.062, 0.0]) and high == pytest.approx([0.062, 0.0])
    assert seen["line"] == (0.5, "--", "chance")
    assert seen["ylim"] == (0.0, 1.0)
    assert "mean and 95% CI over replicates" in seen["title"]
