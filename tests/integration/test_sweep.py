"""The CI sweep: Tune + Optuna + ASHA over real universal trials, its Optuna study read live
while the sweep runs, the sweep killed and resumed, and its best config replayed with
``umim run``."""

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

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from engine.config import load_config
from engine.run.study import run
from engine.tune import sweep

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("breast", "pneumonia", "pathology", "ct-region")


def _done_trials(folder: Path) -> set[str]:
    return {p.name.split(".")[0] for p in (folder / "invocations").glob("*.done")}


def _live_trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as optuna-dashboard reads them (its own connection), or []."""
    if not (folder / "optuna.db").exists():
        return []
    try:
        return optuna.load_study(study_name="ci",
                                 storage=f"sqlite:///{folder / 'optuna.db'}").trials
    except KeyError:  # the file is there, the study not yet
        return []


def test_sweep_killed_resumed_and_best_config_replayed(tmp_path: Path, data_root: Path,
                                                       shard_cache: Path) -> None:
    # The CI sweep plus one parameter that breaks some trials (48 is not a multiple of 5),
    # surely in the second trial (the first point to evaluate after the default): a failing
    # trial must be recorded and must not stop the sweep. Then two trials whose distillation
    # learns nothing (lr 1e-7: the new domains' heads stay random, near chance) reach
    # ASHA's rung after the default one at least once: ASHA stops one of them.
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "ci.yaml").read_text())
    spec["experiment"] = str(REPO / "experiments" / "quickstart.yaml")
    # four 2D domains (two per stage) keep the suite short; the CI sweep runs all eight
    spec["overrides"]["data.domains"] = list(DOMAINS)
    spec["space"]["model.num_heads"] = {"choice": [4, 4, 4, 5]}
    spec["space"]["distill.lr"] = {"choice": [0.001, 1e-7]}
    spec["search"]["points_to_evaluate"] = [
        {"model.num_heads": 5}, {"distill.lr": 1e-7},
        {"distill.lr": 1e-7, "distill.weighting": "uniform"}]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    folder = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["UMIM_CACHE_DIR"] = str(shard_cache)
    log = tmp_path / "sweep.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "sweep", str(sweep_file),
                                 "--out", str(folder), "--data-root", str(data_root)],
                                env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=out)
    live: list[optuna.trial.FrozenTrial] = []  # a running trial with round values, read live
    try:
        deadline = time.monotonic() + 600
        while not _done_trials(folder) or not live:
            assert proc.poll() is None, \
                f"the sweep ended before a trial finished: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no trial finished in 10 minutes"
            if not live:
                trials = _live_trials(folder)
                if proc.poll() is None:  # read while the driver was still running
                    live = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING
                            and t.intermediate_values]
            time.sleep(1.0)
        time.sleep(3)  # Tune saves its experiment state every second (TUNE_GLOBAL_CHECKPOINT_S)
        finished_before = _done_trials(folder)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the sweep's driver
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (folder / "trials.parquet").exists()

    # the live study: a trial still running had its round values in optuna.db
    assert live[0].intermediate_values.keys() <= {1, 2}
    assert all(0.0 <= v <= 1.0 for v in live[0].intermediate_values.values())
    assert live[0].user_attrs["tune_trial_id"]

    result = sweep(resume=folder)
    summary = result.summary
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(trials) == len(result) == 6
    states = {t["trial_id"]: t["state"] for t in trials}
    frame = result.get_dataframe()  # Ray Tune's ResultGrid: a row per trial that reported
    assert set(frame["trial_id"]) == {t for t, s in states.items() if s != "failed"}
    assert "val_auc" in frame.columns
    assert set(states.values()) <= {"completed", "stopped", "failed"}
    assert {"failed", "completed", "stopped"} <= set(states.values())
    domains = DOMAINS
    for t in trials:
        if t["state"] == "failed":
            assert t["param:model.num_heads"] == 5 and "num_heads" in t["error"]
            continue
        # the objective at any round: the mean over all eight domains, chance for those
        # not scored yet (a stopped trial scored only the first stage's four)
        scored = {k: v for k, v in t.items() if k.startswith("val_auc/") and v is not None}
        assert len(scored) == (len(domains) if t["state"] == "completed" else len(domains) // 2)
        assert t["objective"] == pytest.approx(
            (sum(scored.values()) + 0.5 * (len(domains) - len(scored))) / len(domains))

    # the study, by Optuna's own API: stopped trials PRUNED with their round values,
    # finished ones COMPLETE with their objective, failed ones FAIL
    study = optuna.load_study(study_name="ci", storage=result.study_url)
    assert result.study_url == f"sqlite:///{folder / 'optuna.db'}"
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    expected = {"completed": optuna.trial.TrialState.COMPLETE,
                "stopped": optuna.trial.TrialState.PRUNED,
                "failed": optuna.trial.TrialState.FAIL}
    for t in trials:
        ot = by_tune[t["trial_id"]]
        assert ot.state == expected[t["state"]], t["trial_id"]
        if t["state"] == "failed":
            continue
        assert sorted(ot.intermediate_values) == list(range(1, t["rounds_done"] + 1))
        assert ot.value == pytest.approx(t["objective"])
        assert ot.intermediate_values[t["rounds_done"]] == pytest.approx(t["objective"])
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
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
