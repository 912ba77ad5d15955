"""The sweep's searcher and objective without a Tune run: what reaches the Optuna study."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import threading
import types
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest

from engine.config import ExperimentConfig, from_dict
from engine.tune.names import CHANCE_AUC, METRIC, TIME_ATTR, VALIDATED_ROUND, study_url
from engine.tune.objective import objective
from engine.tune.outputs import write_outputs
from engine.tune.schema import load_sweep
from engine.tune.space import tune_space

SPACE = {"distill.temperature": {"loguniform": [0.5, 8.0]},
         "distill.weighting": {"choice": ["uniform", "confidence"]}}
TRIAL_STATE = optuna.trial.TrialState
REPO = Path(__file__).resolve().parents[3]


def test_objective_counts_a_domain_not_scored_at_chance() -> None:
    domains = ["a", "b", "c", "d"]
    assert objective({"a": 0.9, "b": 0.7}, domains) == pytest.approx((0.9 + 0.7 + 1.0) / 4)
    assert objective({d: 0.8 for d in domains}, domains) == pytest.approx(0.8)
    assert objective({}, domains) == CHANCE_AUC
    # a scored domain outside the list is not dropped
    assert objective({"e": 1.0}, ["a"]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one domain"):
        objective({}, [])


def _searcher(folder: Path, rounds: int = 2) -> object:
    from engine.tune.search import LiveOptunaSearch

    searcher = LiveOptunaSearch(folder, study_name="s", rounds=rounds, seed=0,
                                points_to_evaluate=[{"distill.temperature": 4.0,
                                                     "distill.weighting": "uniform"}])
    assert searcher.set_search_properties(METRIC, "max", tune_space(SPACE))
    return searcher


def _round(value: float, server_round: int) -> dict[str, float]:
    return {METRIC: value, TIME_ATTR: float(server_round), "rounds_done": server_round,
            VALIDATED_ROUND: server_round, "training_iteration": 7 * server_round}


def _distill(value: float, server_round: int, fraction: float) -> dict[str, float]:
    return {METRIC: value, TIME_ATTR: server_round - 1 + fraction,
            "rounds_done": server_round - 1, VALIDATED_ROUND: 0,
            "training_iteration": 7 * server_round - 3}


def test_study_is_live_with_round_steps_and_stopped_trials_pruned(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    assert (tmp_path / "optuna.db").is_file()  # the study is in storage before any trial
    first = searcher.suggest("t1")
    assert first == {"distill.temperature": 4.0, "distill.weighting": "uniform"}  # enqueued
    for tid in ("t2", "t3", "t4"):
        searcher.suggest(tid)
    # t1 finishes both rounds; distillation reports in between reach no step
    searcher.on_trial_result("t1", _distill(CHANCE_AUC, 1, 0.5))
    searcher.on_trial_result("t1", _round(0.61, 1))
    searcher.on_trial_result("t1", _distill(0.61, 2, 0.5))
    # a reader in its own connection sees round 1 while the trial runs
    running = optuna.load_study(study_name="s", storage=study_url(tmp_path)).trials[0]
    assert running.state == TRIAL_STATE.RUNNING and running.intermediate_values == {1: 0.61}
    assert running.user_attrs["tune_trial_id"] == "t1"
    searcher.on_trial_result("t1", _round(0.72, 2))
    searcher.on_trial_result("t1", {**_round(0.72, 2), "done": True})  # Tune's duplicate
    searcher.on_trial_complete("t1", result=_round(0.72, 2))
    # t2: ASHA stops it on its round-1 result, which Tune passes only to on_trial_complete
    searcher.on_trial_result("t2", _distill(CHANCE_AUC, 1, 0.9))
    searcher.on_trial_complete("t2", result={**_round(0.55, 1), "done": True})
    # t3 fails; t4 is stopped mid-distillation of round 2 (after its round-1 value)
    searcher.on_trial_complete("t3", error=True)
    searcher.on_trial_result("t4", _round(0.58, 1))
    searcher.on_trial_complete("t4", result=_distill(0.58, 2, 0.4))

    study = optuna.load_study(study_name="s", storage=study_url(tmp_path))
    by_tune = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert by_tune["t1"].state == TRIAL_STATE.COMPLETE and by_tune["t1"].value == 0.72
    assert by_tune["t1"].intermediate_values == {1: 0.61, 2: 0.72}
    assert by_tune["t2"].state == TRIAL_STATE.PRUNED
    assert by_tune["t2"].intermediate_values == {1: 0.55} and by_tune["t2"].value == 0.55
    assert by_tune["t3"].state == TRIAL_STATE.FAIL and by_tune["t3"].value is None
    assert by_tune["t4"].state == TRIAL_STATE.PRUNED
    assert by_tune["t4"].intermediate_values == {1: 0.58}


def test_a_reader_opening_the_study_early_never_races_its_creation(tmp_path: Path) -> None:
    # optuna-dashboard (or the sweep's own test) polling optuna.db while the sweep starts:
    # two connections that meet a new SQLite file both migrate its schema and one fails
    # (UNIQUE constraint failed: alembic_version); the searcher's file appears whole.
    errors: list[Exception] = []
    for attempt in range(5):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        stop = threading.Event()

        def read(db: Path = folder / "optuna.db", stop: threading.Event = stop) -> None:
            while not stop.is_set():
                if db.exists():
                    try:
                        optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
                    except KeyError:  # the file is there, the study not yet
                        pass
                    except Exception as exc:  # any other error is the race
                        errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        try:
            _searcher(folder)
        finally:
            stop.set()
            for reader in readers:
                reader.join()
        assert sorted(p.name for p in folder.iterdir()) == ["optuna.db"]  # nothing staged left
    assert not errors, errors[0]


def test_searcher_survives_its_checkpoint_and_a_rerun(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    searcher.suggest("t1")
    searcher.on_trial_result("t1", _round(0.6, 1))
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))  # what Tune does with the experiment state
    # the driver goes on, finishes t1, and is killed before its next checkpoint
    searcher.on_trial_result("t1", _round(0.7, 2))
    searcher.on_trial_complete("t1", result=_round(0.7, 2))

    (tmp_path / "other").mkdir()  # Tune rebuilds the searcher, then loads its checkpoint
    restored = pickle.loads(pickle.dumps(_searcher(tmp_path / "other")))
    restored.restore(str(checkpoint))
    # Tune reruns t1: reports to a trial the study saw finish are warned about, not raised
    restored.on_trial_result("t1", _round(0.6, 1))
    restored.on_trial_result("t1", _round(0.7, 2))
    restored.on_trial_complete("t1", result=_round(0.7, 2))
    restored.suggest("t2")
    restored.on_trial_complete("t2", result=_round(0.5, 1))
    study = optuna.load_study(study_name="s", storage=study_url(tmp_path))
    assert [t.state for t in study.trials] == [TRIAL_STATE.COMPLETE, TRIAL_STATE.PRUNED]
    assert study.trials[0].value == 0.7 and study.trials[1].user_attrs["tune_trial_id"] == "t2"


def test_outputs_read_the_live_study_and_fail_trials_left_running(tmp_path: Path) -> None:
    searcher = _searcher(tmp_path)
    for tid, value, rounds in [("t1", 0.7, 1), ("t2", 0.6, 2), ("t3", 0.65, 2)]:
        searcher.suggest(tid)
        searcher.on_trial_result(tid, _round(value - 0.1, 1))
        searcher.on_trial_complete(tid, result=_round(value, rounds))
    searcher.suggest("lost")  # asked by a driver that was then killed
    sweep_cfg, base = load_sweep(REPO / "experiments" / "sweeps" / "ci.yaml")
    sweep_cfg = dataclasses.replace(sweep_cfg, name="s")
    assert from_dict(ExperimentConfig, base).planned_rounds() == 2
    grid = [types.SimpleNamespace(
        metrics={METRIC: v, "rounds_done": r, "trial_id": tid, **scored},
        config={"distill.temperature": 4.0, "distill.weighting": "uniform"},
        path=str(tmp_path / f"trial_{tid}"), error=None)
        for tid, v, r, scored in [("t1", 0.7, 1, {"val_auc/a": 0.9}),
                                  ("t2", 0.6, 2, {"val_auc/a": 0.7, "val_auc/b": 0.5}),
                                  ("t3", 0.65, 2, {})]]
    summary = write_outputs(tmp_path, sweep_cfg, base, grid)
    assert summary["states"] == {"completed": 2, "stopped": 1, "failed": 0}
    assert summary["best_trial"] == "t3"  # t1 scores higher but was stopped
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    assert [(r["trial_id"], r["val_auc/a"], r["val_auc/b"]) for r in rows] == [
        ("t1", 0.9, None), ("t2", 0.7, 0.5), ("t3", None, None)]  # every trial's columns
    study = optuna.load_study(study_name="s", storage=study_url(tmp_path))
    states = {t.user_attrs["tune_trial_id"]: t.state for t in study.trials}
    assert states == {"t1": TRIAL_STATE.PRUNED, "t2": TRIAL_STATE.COMPLETE,
                      "t3": TRIAL_STATE.COMPLETE, "lost": TRIAL_STATE.FAIL}
    importance = json.loads((tmp_path / "importance.json").read_text())
    assert set(importance) <= set(SPACE) and all(math.isfinite(v) for v in importance.values())
