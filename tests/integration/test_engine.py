from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
import torch

from engine.cluster.resources import ResourceError
from engine.config import ExperimentConfig, load_config
from engine.fl.simulation import Callback, RunError, Simulation
from engine.run.study import resume, run
from strategies import register_strategy
from strategies.fedavg import FedAvg

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]


def _smoke(shard_cache: Path, *overrides: str) -> ExperimentConfig:
    return load_config(REPO / "experiments" / "smoke.yaml",
                       [f"data.cache_dir={shard_cache}", *overrides])


def test_fedavg_over_the_eight_domains(tmp_path: Path, data_root: Path, shard_cache: Path
                                       ) -> None:
    cfg = load_config(REPO / "experiments" / "fedavg_8domains.yaml",
                      [f"data.cache_dir={shard_cache}"])
    result = run(cfg, out=tmp_path / "run", data_root=str(data_root), quiet=True)
    run_dir = tmp_path / "run"
    assert {"config.yaml", "history.parquet", "summary.json", "checkpoints"} <= set(
        os.listdir(run_dir))
    saved = load_config(run_dir / "config.yaml")
    # the saved config pins no machine path (it replays on another machine)
    assert saved.data.data_root is None and saved.strategy.name == "fedavg"
    assert str(data_root) not in (run_dir / "config.yaml").read_text()
    frame = result.history.to_pandas()  # notebooks get DataFrames; fit rows carry their domain
    fits = frame[frame.phase == "fit"]
    assert len(fits) and (fits.domain == fits.client).all()
    assert set(result.results.to_pandas().method) == {"fedavg"}
    table = pq.read_table(run_dir / "history.parquet")
    assert table.column_names == ["round", "client", "domain", "phase", "metric", "value"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["domains"]) == list(cfg.data.domains)
    for domain, row in summary["domains"].items():
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["acc"] <= 1.0, domain
    assert summary["failures"] == [] and summary["fit_samples_per_s"] > 0
    val_rounds = {r.round for r in result.history.records if r.phase == "val"}
    assert val_rounds == {1, 2}
    assert (run_dir / "checkpoints" / "round-0002" / "COMPLETE").exists()


class KillOneActor(Callback):
    """SIGKILLs the process of the actor serving ``breast`` right after round 2's fit starts."""

    def __init__(self) -> None:
        self.killed: int | None = None
        self.after: list[int] = []

    def on_tasks_submitted(self, sim: Simulation, phase: str, server_round: int) -> None:
        if phase == "fit" and server_round == 2 and self.killed is None:
            import ray

            pid = ray.get(sim.actors.actor_of("breast").describe.remote())["pid"]
            os.kill(pid, signal.SIGKILL)
            self.killed = pid

    def on_round_end(self, sim: Simulation, server_round: int) -> None:
        self.after = [a["pid"] for a in sim.actors.describe()]


# a task per client (two actors), or (clients.dispatch=actor) one actor's share of the round
# in one task: both clients on one actor, the killed task held both
DISPATCH = {"per-client": (), "per-actor": ("clients.dispatch=actor", "clients.num_actors=1")}


@pytest.mark.parametrize("dispatch", list(DISPATCH))
def test_kill_9_of_a_client_actor_does_not_lose_the_round(tmp_path: Path, data_root: Path,
                                                          shard_cache: Path, dispatch: str
                                                          ) -> None:
    cb = KillOneActor()
    cfg = _smoke(shard_cache, "strategy.rounds=2", *DISPATCH[dispatch])
    result = run(cfg, out=tmp_path / "k", data_root=str(data_root), quiet=True, callbacks=[cb])
    assert cb.killed is not None and cb.killed not in cb.after  # the actor really was replaced
    fit_round2 = {r.client for r in result.history.records if r.phase == "fit" and r.round == 2}
    assert fit_round2 == {"breast", "pathology"}
    assert result.summary["failures"] == []


@register_strategy
class DivergeBreast(FedAvg):
    """Test strategy: drives the breast client's training to overflow in round 1 and makes
    it raise in round 2 (a negative learning rate)."""

    name: ClassVar[str] = "test-diverge-breast"

    def fit_config(self, server_round: int, cid: str) -> dict[str, Any]:
        if cid != "breast":
            return {}
        return {"lr": 1e30} if server_round == 1 else {"lr": -1.0}


def test_nonfinite_update_is_rejected_never_averaged(tmp_path: Path, data_root: Path,
                                                     shard_cache: Path) -> None:
    cfg = _smoke(shard_cache, "strategy.name=test-diverge-breast", "train.optimizer=sgd",
                 "clients.min_fit_fraction=0.5", "strategy.rounds=2")
    result = run(cfg, out=tmp_path / "n", data_root=str(data_root), quiet=True)
    rejected = [r for r in result.history.records if r.phase == "failure"]
    assert [(r.round, r.client, r.metric) for r in rejected] == [
        (1, "breast", "nonfinite_update"), (2, "breast", "task_error")]
    encoder = result.strategy_state["encoder"]
    assert all(torch.isfinite(v).all() for v in encoder.values())
    assert result.summary["failures"][0]["kind"] == "nonfinite_update"
    assert "Invalid learning rate" in result.summary["failures"][1]["reason"]
    strict = _smoke(shard_cache, "strategy.name=test-diverge-breast", "train.optimizer=sgd")
    with pytest.raises(RunError, match=r"only 1 of 2 clients returned a valid update"):
        run(strict, out=tmp_path / "strict", data_root=str(data_root), quiet=True)


def test_more_gpus_than_the_cluster_has_fails_fast(tmp_path: Path, data_root: Path,
                                                   shard_cache: Path) -> None:
    cfg = _smoke(shard_cache, "clients.num_gpus=1")
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"clients\.num_gpus"):
        run(cfg, out=tmp_path / "g", data_root=str(data_root), quiet=True)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "g" / "config.yaml").exists()


def _final_encoder(run_dir: Path) -> dict[str, torch.Tensor]:
    from engine.records.checkpoint import latest_checkpoint
    from engine.records.storage import Storage

    ckpt = latest_checkpoint(Storage(run_dir))
    assert ckpt is not None
    return ckpt.strategy


def test_killed_driver_resumes_to_the_same_weights(tmp_path: Path, data_root: Path,
                                                   shard_cache: Path) -> None:
    overrides = [f"data.cache_dir={shard_cache}", "strategy.rounds=4"]
    reference = run(load_config(REPO / "experiments" / "smoke.yaml", overrides),
                    out=tmp_path / "ref", data_root=str(data_root), quiet=True)
    crashed = tmp_path / "crashed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run",
                             str(REPO / "experiments" / "smoke.yaml"), *overrides,
                             "--out", str(crashed), "--data-root", str(data_root), "--quiet"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # any complete checkpoint (round 1's is pruned after round 3: keep_checkpoints=2)
        deadline = time.monotonic() + 180
        while not list(crashed.glob("checkpoints/round-*/COMPLETE")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the driver mid-run
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left of that session
    assert not (crashed / "summary.json").exists(), "the driver finished before the kill"
    resumed = resume(crashed, quiet=True)
    ref_state, res_state = reference.strategy_state, resumed.strategy_state
    for key, value in ref_state["encoder"].items():
        assert torch.equal(value, res_state["encoder"][key]), key
    for cid, head in ref_state["heads"].items():
        for key, value in head.items():
            assert torch.equal(value, res_state["heads"][cid][key]), (cid, key)
    assert resumed.summary["domains"] == reference.summary["domains"]
    rounds = sorted({r.round for r in resumed.history.records if r.phase == "fit"})
    assert rounds == [1, 2, 3, 4]
    assert not math.isnan(resumed.summary["mean_test_auc"])
