"""report.html (self-contained: figures embedded, tables as HTML), the per-round learning
curves read from the runs' histories, every distillation loss term plotted, and the sweep's
plots linked for a run started from a sweep's best.yaml."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from engine.records.history import History
from engine.records.report import (
    HTML_REPORT,
    ORIGIN,
    PLOT_CURVES,
    learning_curves,
    sweep_of,
    write_report,
)
from engine.records.storage import Storage
from strategies.distill import LOSS_NAMES

DOMAINS = ["breast", "retina"]


def _history(values: dict[tuple[int, str, str], float]) -> bytes:
    """(round, client, domain) -> val AUC, plus noise rows a curve must ignore."""
    h = History()
    for (rnd, client, domain), auc in values.items():
        h.add(rnd, client, "val", {"auc": auc, "acc": 0.1}, domain=domain)
        h.add(rnd, client, "test", {"auc": 0.99}, domain=domain)
        h.add(rnd, client, "fit", {"train_loss": 1.0}, domain=domain)
    h.add(1, "retina", "val", {"auc": math.nan}, domain="retina")  # a NaN is left out
    return h.to_parquet_bytes()


def _run(tmp_path: Path) -> Path:
    """A finished study: a universal main run (2 clients per domain, retina from round 2)
    and a FedAvg baseline, a distillation curve, a summary."""
    run = tmp_path / "run"
    storage = Storage(run)
    storage.write_bytes("history.parquet", _history({
        (1, "breast#0", "breast"): 0.6, (1, "breast#1", "breast"): 0.7,
        (2, "breast#0", "breast"): 0.8, (2, "breast#1", "breast"): 0.9,
        (2, "retina#0", "retina"): 0.55, (2, "retina#1", "retina"): 0.65}))
    storage.write_bytes("baselines/fedavg-seed0/history.parquet", _history({
        (r, f"{d}#{i}", d): 0.5 + 0.1 * r for r in (1, 2, 3) for d in DOMAINS
        for i in (0, 1)}))
    row = {"step": 25.0, "kd": 0.1, "feature": 0.5, "retention": 0.0, "loss": 0.2,
           "agreement": 0.9, "best_agreement": 0.9, "elapsed_s": 1.0}
    curve = [row, {**row, "step": 50.0, "kd": 0.05, "retention": 0.01, "loss": 0.1}]
    curve = [{**r, **{t: 0.3 for t in LOSS_NAMES if t not in r}} for r in curve]
    storage.write_text("distill_curves.json", json.dumps({"1": curve}))
    cell = {"mean": 0.7, "std": 0.0, "n": 1, "ci_low": math.nan, "ci_high": math.nan}
    storage.write_text("summary.json", json.dumps({
        "name": "study", "strategy": "universal", "rounds": 2, "seed": 0, "domains": DOMAINS,
        "methods": {m: {d: {"auc": cell, "acc": cell} for d in DOMAINS}
                    for m in ("universal", "fedavg")}}))
    return run


def test_learning_curves_are_the_mean_val_auc_over_a_domains_clients(
        tmp_path: Path) -> None:
    curves = learning_curves(str(_run(tmp_path)))
    assert list(curves.columns) == ["method", "replicate", "seed", "round", "domain", "auc"]
    got = {(r.method, r.round, r.domain): r.auc for r in curves.itertuples()}
    assert got[("universal", 1, "breast")] == pytest.approx(0.65)
    assert got[("universal", 2, "breast")] == pytest.approx(0.85)
    assert got[("universal", 2, "retina")] == pytest.approx(0.60)
    assert ("universal", 1, "retina") not in got  # only a NaN that round: no point
    assert [got[("fedavg", r, "retina")] for r in (1, 2, 3)] == pytest.approx([0.6, 0.7, 0.8])
    assert len(curves) == 3 + 6
    assert set(curves["seed"]) == {0}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_report_is_self_contained_with_curves_tables_and_the_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    labels: list[str] = []
    plot = matplotlib.axes.Axes.plot

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        labels.append(str(kwargs.get("label", "")))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    run = _run(tmp_path)
    sweep = tmp_path / "sweeps" / "lr"
    sweep.mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("name: lr\n")
    (sweep / "best.yaml").write_text("name: study\n")
    (sweep / "summary.json").write_text(json.dumps({"trials": 4, "best_trial": "t3",
                                                    "best_objective": 0.71,
                                                    "states": {"completed": 3}}))
    png = b"\x89PNG\r\n\x1a\n" + b"objective-plot"
    (sweep / "objective.png").write_bytes(png)
    (run / ORIGIN).write_text(json.dumps({"config_file": str(sweep / "best.yaml")}))
    assert sweep_of(str(run)) == sweep.resolve()

    text = Path(write_report(str(run))).read_text()
    assert f"![learning curves]({PLOT_CURVES})" in text
    assert "](../sweeps/lr/objective.png)" in text and "best trial t3" in text
    for term in LOSS_NAMES:  # every named term with a non-zero value has its line
        assert f"round 1: {term}" in labels

    page = (run / HTML_REPORT).read_text()
    tags = _Tags()
    tags.feed(page)
    images = [a for t, a in tags.tags if t == "img"]
    assert len(images) >= 4  # per-domain AUC, learning curves, distillation, sweep
    assert all(str(a["src"]).startswith("data:image/png;base64,") for a in images)
    fetched = [(t, a) for t, a in tags.tags if t in ("script", "link", "iframe", "img")
               and any(str(a.get(k, "")).startswith(("http:", "https:", "//"))
                       for k in ("src", "href"))]
    assert not fetched and "@import" not in page and "url(" not in page
    curve = next(a for a in images if a["alt"] == "learning curves")
    embedded = base64.b64decode(str(curve["src"]).split(",", 1)[1])
    assert embedded == (run / PLOT_CURVES).read_bytes()
    sweep_img = next(a for a in images if a["alt"] == "sweep objective")
    assert base64.b64decode(str(sweep_img["src"]).split(",", 1)[1]) == png
    assert sum(t == "table" for t, _ in tags.tags) >= 2  # AUC and ACC tables
    assert "<td>universal</td>" in page and "<h2>Learning curves</h2>" in page
