"""The CI sweep: Tune + Optuna + ASHA over real universal trials, killed and resumed, and its
best config replayed with ``umim run``."""

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

import pyarrow.parquet as pq
import pytest
import yaml

from engine.config import load_config
from engine.run.study import run
from engine.tune import sweep

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]


def _done_trials(folder: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (folder / "invocations").glob("*.done")}


def test_sweep_killed_resumed_and_best_config_replayed(tmp_path: Path, data_root: Path,
                                                       shard_cache: Path) -> None:
    # The CI sweep plus one parameter that breaks some trials (48 is not a multiple of 5),
    # surely in the second trial (the first point to evaluate after the default): a failing
    # trial must be recorded and must not stop the sweep.
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "ci.yaml").read_text())
    spec["experiment"] = str(REPO / "experiments" / "quickstart.yaml")
    spec["space"]["model.num_heads"] = {"choice": [4, 4, 4, 5]}
    spec["search"]["points_to_evaluate"] = [{"model.num_heads": 5}]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["UMIM_CACHE_DIR"] = str(shard_cache)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "sweep", str(sweep_file),
                             "--out", str(folder), "--data-root", str(data_root)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not _done_trials(folder):
            assert proc.poll() is None, "the sweep ended before a trial finished"
            assert time.monotonic() < deadline, "no trial finished in 10 minutes"
            time.sleep(0.5)
        time.sleep(3)  # Tune saves its experiment state every second (TUNE_GLOBAL_CHECKPOINT_S)
        finished_before = _done_trials(folder)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the sweep's driver
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (folder / "trials.parquet").exists()

    summary = sweep(resume=folder)
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(trials) == 6
    states = {t["trial_id"]: t["state"] for t in trials}
    assert set(states.values()) <= {"completed", "stopped", "failed"}
    assert "failed" in states.values() and "completed" in states.values()
    for t in trials:
        if t["state"] == "failed":
            assert t["param:model.num_heads"] == 5 and "num_heads" in t["error"]
        else:
            assert 0.0 <= t["objective"] <= 1.0
    # finished trials were not run again; unfinished ones were
    invocations: dict[str, int] = {}
    for p in (folder / "invocations").iterdir():
        if not p.name.endswith(".done"):
            key = p.name.split(".")[0]
            invocations[key] = invocations.get(key, 0) + 1
    for trial_id in finished_before:
        assert invocations[trial_id] == 1, trial_id
    assert set(invocations) == set(states)

    for name in ("best.yaml", "objective.png", "importance.png", "optuna.db"):
        assert (folder / name).exists(), name
    importance = json.loads((folder / "importance.json").read_text())
    assert set(importance) <= set(spec["space"])
    assert summary["best_trial"] in states and states[summary["best_trial"]] == "completed"

    # best.yaml is a config `umim run` accepts, and reproduces its trial's objective
    best = load_config(folder / "best.yaml")
    assert best.distill.temperature == pytest.approx(
        summary["best_params"]["distill.temperature"])
    assert str(data_root) not in (folder / "best.yaml").read_text()  # portable
    replay = run(best, out=tmp_path / "replay", data_root=str(data_root),
                 cache_dir=str(shard_cache), quiet=True)
    assert not math.isnan(replay.summary["mean_val_auc"])
    assert replay.summary["mean_val_auc"] == pytest.approx(summary["best_objective"], abs=0.02)
