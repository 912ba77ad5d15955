"""``umim bench gpu`` without a GPU: the refusal, the table, the configs of its checks. (The
whole ``--force-cpu`` run takes minutes; ``umim bench gpu --force-cpu`` runs it.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine.bench.gpu as gpu
from engine.cli import main as cli

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal")


@needs_no_cuda
def test_without_cuda_it_refuses_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err and "--force-cpu" in err


def test_unknown_checks_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "gpu", "--force-cpu", "--only", "pytest,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_failed_check_is_a_row_and_the_next_one_still_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(where: gpu.Where) -> str:
        raise RuntimeError("CUDA error: out of\nmemory")

    def false(where: gpu.Where) -> str:
        raise gpu.CheckFailedError("the MIM base came from the cache")

    fake = {"pytest": lambda where: f"ok {where.force_cpu}", "federated": broken,
            "mim-distill": false, "bench-fedavg": lambda where: "ok",
            "bench-crossdevice": lambda where: "ok"}
    monkeypatch.setattr(gpu, "CHECK_FUNCTIONS", fake)
    assert cli(["bench", "gpu", "--force-cpu", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [(r["check"], r["result"]) for r in out["rows"]] == [
        ("pytest", "passed"), ("federated", "FAILED"), ("mim-distill", "FAILED"),
        ("bench-fedavg", "passed"), ("bench-crossdevice", "passed")]
    details = [r["detail"] for r in out["rows"]]
    assert details == ["ok True", "RuntimeError: CUDA error: out of memory",
                       "the MIM base came from the cache", "ok", "ok"]
    assert out["passed"] is False and out["mode"].startswith("cpu")
    assert all(r["wall_s"] >= 0 for r in out["rows"])
    assert cli(["bench", "gpu", "--force-cpu", "--only", "pytest"]) == 0
    assert "ok True" in capsys.readouterr().out


@pytest.mark.parametrize("force_cpu", [False, True])
def test_the_configs_of_the_checks_load(force_cpu: bool) -> None:
    sliced = gpu._load("paper.yaml", gpu._slice_overrides(force_cpu))
    assert sliced.data.domains == ("breast", "pneumonia") and sliced.planned_rounds() == 1
    assert sliced.pretrain.method == "mim" and sliced.strategy.name == "universal"
    assert sliced.pretrain.use_gpu is sliced.distill.use_gpu is (not force_cpu)
    assert not sliced.evaluation.baselines and not sliced.evaluation.lodo_domains
    assert sliced.train.precision == ("bf16" if force_cpu else "auto")
    packed = gpu._load("fedavg_8domains.yaml", gpu._federated_overrides(force_cpu))
    assert len(packed.data.domains) == 8 and packed.strategy.name == "fedavg"
    assert packed.train.precision == "bf16"
    assert (packed.clients.num_actors, packed.clients.num_gpus) == ((2, 0.0) if force_cpu
                                                                    else (8, 0.125))


def test_the_pytest_check_runs_tests_gpu(data_root: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU this runs every GPU test; umim bench gpu does that")
    detail = gpu.check_pytest(gpu.Where(data_root=str(data_root), force_cpu=True))
    assert "skipped" in detail
