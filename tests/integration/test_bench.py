"""The three benchmarks at a small size: the comparisons are correct (not how fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main as cli

pytestmark = [pytest.mark.integration]


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    """The JSON document the command printed last (a line that is just ``{`` opens it)."""
    lines = capsys.readouterr().out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_bench_fedavg_methods_agree(data_root: Path, capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    # flower-resident is left out to save CI time: it is engine.interop.flower's ClientApp, which
    # tests/integration/test_flower.py runs in Flower's simulation
    code = cli(["bench", "fedavg", "--clients", "2", "--rounds", "1", "--samples-per-client",
                "32", "--batch-size", "16", "--arch", "vit", "--json",
                "--methods", "sequential,engine,flower,ceiling", "--data-root", str(data_root)])
    out = _json(capsys)
    assert code == 0 and out["accuracy_agrees"]
    by = {r["method"]: r for r in out["rows"]}
    assert list(by) == ["sequential", "engine", "flower", "ceiling"]
    # same start, same batches, same clients: the three final models are the same model,
    # whether trained by the engine's client or Flower's quickstart-style one (float
    # rounding only: the engine's client trains channels-last, the other does not)
    assert out["max_weight_difference"] < 1e-3
    for row in out["rows"]:  # every method trained the same number of samples
        assert row["samples"] == 2 * 32
        assert row["of_ceiling"] == pytest.approx(row["samples_per_s"]
                                                  / by["ceiling"]["samples_per_s"])
    engine = by["engine"]
    assert engine["speedup_vs_flower"] == pytest.approx(by["flower"]["wall_s"]
                                                        / engine["wall_s"])
    assert "speedup_vs_flower_resident" not in engine
    assert "test_acc" not in by["ceiling"]  # the ceiling is timed, not federated or scored


@pytest.mark.usefixtures("ray_local")
def test_bench_distill_single_process_and_ddp(data_root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "distill", "--steps", "4", "--batch-size", "16", "--workers", "2",
                "--pool-size", "200", "--tiny", "--json", "--data-root", str(data_root)]) == 0
    rows = _json(capsys)["rows"]
    assert [(r["method"], r["workers"]) for r in rows] == [("single process", 1),
                                                            ("Ray Train", 2)]
    assert all(r["samples_per_s"] > 0 and r["wall_s"] >= r["train_s"] for r in rows)


@pytest.mark.usefixtures("ray_local")
def test_bench_scale_packs_virtual_clients(data_root: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "scale", "--clients", "40", "--actors", "2", "--rounds", "1",
                "--json", "--data-root", str(data_root)]) == 0
    (row,) = _json(capsys)["rows"]
    assert row["clients"] == 40 and row["actors"] == 2 and row["clients_per_actor"] == 20
    assert 0 < row["peak_rss_gb"] < 8


@pytest.mark.usefixtures("ray_local")
def test_bench_crossdevice_rows_train_the_same_clients_and_agree(
        data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(["bench", "crossdevice", "--clients", "40", "--per-round", "4", "--rounds", "2",
                "--samples-per-client", "64", "--rows", "sequential,umim,flower", "--json",
                "--data-root", str(data_root)])
    out = _json(capsys)
    assert code == 0 and out["passed"] and out["failures"] == []
    by = {r["method"]: r for r in out["rows"]}
    assert list(by) == ["sequential", "umim", "flower"]
    # the engine's seeded sample: 4 distinct clients a round, not the same twice
    sampled = out["sampled"]
    assert len(sampled) == 2 and sampled[0] != sampled[1]
    assert all(len(set(r)) == 4 and r == sorted(r) and max(r) < 40 for r in sampled)
    assert out["updates"] == 8 and out["data"]["train_samples"] == 40 * 64
    seq = by["sequential"]
    for name in ("umim", "flower"):  # the same clients, batches and weights
        row = by[name]
        assert row["same_clients"] is True
        assert row["max_abs_diff"] <= 1e-5
        assert row["test_acc"] == pytest.approx(seq["test_acc"], abs=1e-3)
        assert row["startup_s"] > 0 and row["wall_s"] > row["rounds_s"] > 0
        assert row["overhead_ms_per_update"] == pytest.approx(
            (row["rounds_s"] - seq["rounds_s"]) / 8 * 1e3)
        assert 0 < row["peak_rss_gb"] < 16
    assert seq["max_abs_diff"] == 0 and seq["test_acc"] > 1 / 6  # it learnt something
    assert by["umim"]["actors"] == 2 and by["umim"]["clients_per_actor"] == 20
    assert by["umim"]["x_flower"] == pytest.approx(by["flower"]["rounds_s"]
                                                   / by["umim"]["rounds_s"])
