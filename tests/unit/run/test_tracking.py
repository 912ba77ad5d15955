"""MLflow tracking without Ray: the config keys, the flattened params, the metric names of a
history, and the sweep's Tune callback logging into a real MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from engine.config import ExperimentConfig, from_dict, load_config, to_dict
from engine.config.loader import ConfigError
from engine.records.history import History
from engine.records.storage import Storage
from engine.run.tracking import (
    MAX_PARAM_LENGTH,
    check_tracking,
    flatten_params,
    history_metrics,
    sweep_callback,
)

REPO = Path(__file__).resolve().parents[3]


def test_tracking_is_off_by_default_and_checked_at_load() -> None:
    assert ExperimentConfig().run.tracking == "none"
    cfg = load_config(REPO / "experiments" / "smoke.yaml", ["run.tracking=mlflow"])
    assert cfg.run.tracking == "mlflow" and cfg.run.tracking_uri is None
    with pytest.raises((ConfigError, ValueError), match=r"run\.tracking"):
        from_dict(ExperimentConfig, {"run": {"tracking": "wandb"}})
    with pytest.raises((ConfigError, ValueError), match=r"run\.tracking_uri"):
        from_dict(ExperimentConfig, {"run": {"tracking": "mlflow", "tracking_uri": "runs/x"}})
    with pytest.raises((ConfigError, ValueError), match=r"run\.tracking_experiment"):
        from_dict(ExperimentConfig, {"run": {"tracking_experiment": " "}})
    # the embedded store needs a local run folder; a server URI does not
    with pytest.raises(ValueError, match=r"run\.tracking_uri"):
        check_tracking(cfg, Storage("mock:///remote-run"))
    served = from_dict(ExperimentConfig, {"run": {"tracking": "mlflow",
                                                  "tracking_uri": "http://127.0.0.1:5000"}})
    check_tracking(served, Storage("mock:///remote-run"))


def test_flatten_params_dotted_keys_json_leaves_and_limits() -> None:
    params = flatten_params({"train": {"lr": 0.001, "grad_clip": None, "schedule": "cosine"},
                             "data": {"domains": ["breast", "retina"],
                                      "extra_domains": {}},
                             "model": {"options": {"width": 2}},
                             "evaluation": {"primary": {"a": "main"}},
                             "long": "x" * 7000, "odd key!": True})
    assert params["train.lr"] == "0.001" and params["train.grad_clip"] == "null"
    assert params["train.schedule"] == "cosine"
    assert json.loads(params["data.domains"]) == ["breast", "retina"]
    assert params["data.extra_domains"] == "{}" and params["model.options.width"] == "2"
    assert params["evaluation.primary.a"] == "main" and params["odd key_"] == "true"
    assert len(params["long"]) == MAX_PARAM_LENGTH and params["long"].endswith("[truncated]")
    # a whole resolved config: every leaf, all of them short enough for MLflow
    full = flatten_params(to_dict(ExperimentConfig()))
    assert full["run.tracking"] == "none" and full["strategy.name"] == "fedavg"
    assert len(full) > 100 and all(len(v) <= MAX_PARAM_LENGTH for v in full.values())


def test_history_metrics_per_domain_per_client_with_the_round_as_step() -> None:
    history = History()
    for rnd, (a, b) in enumerate([(0.6, 0.8), (0.7, 0.9)], start=1):
        history.add(rnd, "breast-0", "val", {"auc": a}, domain="breast")
        history.add(rnd, "breast-1", "val", {"auc": b}, domain="breast")
        history.add(rnd, "retina", "val", {"auc": 0.5}, domain="retina")
        history.add(rnd, "retina", "fit", {"train_loss": 1.0 / rnd}, domain="retina")
    history.add(2, "", "server", {"aggregate_seconds": 0.25})
    history.add(2, "retina", "test", {"auc": math.nan}, domain="retina")
    metrics = {(k, s): v for k, v, s in history_metrics(history)}
    assert metrics[("val_auc/breast", 1)] == pytest.approx(0.7)  # mean of the domain's clients
    assert metrics[("val_auc/breast", 2)] == pytest.approx(0.8)
    assert metrics[("val_auc/mean", 2)] == pytest.approx((0.8 + 0.5) / 2)
    assert metrics[("fit_train_loss/retina", 2)] == pytest.approx(0.5)
    assert metrics[("server_aggregate_seconds", 2)] == 0.25
    assert not any(k.startswith("test_") for k, _ in metrics)  # NaN is not logged
    assert {s for _, s in metrics} == {1, 2}
    later = history_metrics(history, after_round=1)
    assert {s for _, _, s in later} == {2}


class _Trial:
    """What the callback reads of a Tune trial (Ray's own ``Trial`` needs a running Tune)."""

    def __init__(self, config: dict[str, Any], local_path: str) -> None:
        self.config, self.local_path = config, local_path

    def __str__(self) -> str:
        return "trial_0001"


def test_the_sweep_callback_logs_each_trial_into_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    base = to_dict(load_config(REPO / "experiments" / "smoke.yaml", ["run.tracking=mlflow"]))
    assert sweep_callback(to_dict(ExperimentConfig()), tmp_path, "off", metric="val_auc",
                          time_attr="round") is None  # no tracking: no callback
    callback = sweep_callback(base, tmp_path, "ci", metric="val_auc", time_attr="round")
    callback.setup()
    trial = _Trial({"train.lr": 0.01, "__sweep": {"base": base}}, str(tmp_path))
    callback.log_trial_start(trial)
    for rnd in (1, 2):
        callback.log_trial_result(rnd, trial, {"val_auc": 0.5 + rnd / 10, "round": float(rnd),
                                               "rounds_done": rnd,
                                               "val_auc/breast": 0.6 + rnd / 10})
    # a distillation's report between rounds (fractional progress) is not a round's
    callback.log_trial_result(3, trial, {"val_auc": 0.7, "round": 2.5, "rounds_done": 2,
                                         "loss": 1.0})
    callback.log_trial_end(trial)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ci")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["umim.sweep"] == "ci"
    params = run.data.params
    assert params["train.lr"] == "0.01"  # the sampled value over the base's
    assert params["strategy.name"] == "fedavg" and params["run.tracking"] == "mlflow"
    assert params["train.optimizer"] == "adamw" and len(params) > 100  # defaults resolved
    assert not any(k.startswith("__") for k in params)
    history = client.get_metric_history(run.info.run_id, "val_auc")
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.7)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc/breast")] == [1, 2]
    assert "loss" not in run.data.metrics
