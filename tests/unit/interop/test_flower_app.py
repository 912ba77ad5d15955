"""The Flower app's run config and its checks, without starting Flower (fast, no data)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer")

REPO = Path(__file__).resolve().parents[3]
APP_CONFIG = REPO / "examples" / "flower-app" / "pyproject.toml"


def _settings(**run_config: object):
    from engine.interop.flower_app import AppSettings

    return AppSettings.from_run_config({"experiment": "experiments/smoke.yaml", **run_config})


def test_the_app_pyproject_sets_every_key_with_the_defaults() -> None:
    from dataclasses import fields

    from engine.interop.flower_app import AppSettings

    app = tomllib.loads(APP_CONFIG.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "umim_flower.server_app:app",
                                 "clientapp": "umim_flower.client_app:app"}
    config = app["config"]
    assert sorted(config) == sorted(f.name.replace("_", "-") for f in fields(AppSettings))
    settings = AppSettings.from_run_config(config)  # every default passes its own checks
    assert settings == AppSettings(experiment=config["experiment"])
    assert settings.experiment_path() == REPO / "experiments" / "smoke.yaml"


@pytest.mark.parametrize(("run_config", "message"), [
    ({"num-rounds": 2}, "unknown key"),
    ({"num-server-rounds": "2"}, "num-server-rounds: expected int"),
    ({"num-server-rounds": 2.0}, "num-server-rounds: expected int"),
    ({"accept-failures": 1}, "accept-failures: expected bool"),
    ({"fraction-train": 0.0}, "fraction-train must be in (0, 1]"),
    ({"eval-split": "dev"}, "eval-split must be one of"),
    ({"experiment": ""}, "experiment: name an experiment YAML"),
    ({"experiment": "experiments/nope.yaml"}, "not found (looked at"),
])
def test_bad_run_config_is_one_clear_error(run_config: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        _settings(**run_config).load_experiment()
    assert message in str(err.value)


def test_round_timeout_accepts_an_int_and_overrides_reach_the_experiment() -> None:
    settings = _settings(**{"round-timeout": 60, "overrides": "data.max_train_samples=8 seed=3"})
    assert settings.round_timeout == 60.0
    cfg = settings.load_experiment()
    assert cfg.data.max_train_samples == 8 and cfg.seed == 3
    with pytest.raises(ValueError, match=r"experiment .*smoke\.yaml: .*strategy"):
        _settings(overrides="strategy.rounds=0").load_experiment()


def test_only_fedavg_family_strategies_run() -> None:
    from engine.interop.flower_app import check_fedavg

    assert check_fedavg(_settings().load_experiment()) == {}
    fedprox = _settings(overrides="strategy.name=fedprox strategy.proximal_mu=0.5")
    assert check_fedavg(fedprox.load_experiment()) == {"proximal_mu": 0.5}
    quickstart = _settings(experiment="experiments/quickstart.yaml").load_experiment()
    with pytest.raises(ValueError, match=r"strategy\.name=.universal.: the Flower app runs"):
        check_fedavg(quickstart)


def test_a_node_config_that_names_no_client_is_refused_before_any_shard() -> None:
    from engine.interop.flower_app import build_client

    settings = _settings()  # smoke: breast, pathology
    with pytest.raises(ValueError, match=r"partition-id=2: the experiment has 2 client\(s\) "
                                         r"\(breast, pathology\), ids 0..1"):
        build_client(settings, {"partition-id": 2})
    with pytest.raises(ValueError, match="num-partitions=3: the experiment has 2"):
        build_client(settings, {"partition-id": 0, "num-partitions": 3})
    with pytest.raises(ValueError, match="partition-id: missing"):
        build_client(settings, {})
