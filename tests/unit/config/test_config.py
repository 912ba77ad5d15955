from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, ExperimentConfig, dump_yaml, load_config, to_dict
from engine.config.loader import from_dict


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("name: x\nclients:\n  num_actors: 2\nstrategy:\n  rounds: 3\n")
    cfg = load_config(path, ["clients.num_gpus=0.25", "data.domains=[breast, retina]",
                             "strategy.name=fedprox", "train.lr=1e-4"])
    assert cfg.name == "x" and cfg.clients.num_actors == 2 and cfg.clients.num_gpus == 0.25
    assert cfg.data.domains == ("breast", "retina") and cfg.strategy.rounds == 3
    assert cfg.train.lr == pytest.approx(1e-4)
    with pytest.raises(AttributeError):
        cfg.name = "y"  # type: ignore[misc]


@pytest.mark.parametrize(("override", "message"), [
    ("clients.num_gpu=1", r"unknown config key\(s\) \['clients.num_gpu'\]"),
    ("colour=red", r"unknown config key\(s\) \['colour'\]"),
    ("model.arch=vgg",
     r"model.arch: unknown encoder 'vgg'; registered: \['cnn', 'resnet18', 'vit', 'vit_conv'\]"),
    ("train.batch_size=big", "train.batch_size: expected an integer"),
    ("train.local_epochs=0", "local_epochs"),
    ("clients.min_fit_fraction=0", "min_fit_fraction"),
    ("data.domains=breast", "expected a list"),
    ("model.patch_size=5", "must divide 28"),
    ("noequals", "key=value"),
])
def test_bad_keys_and_values_are_clear_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.extra_domains={chest: {source: medmnist, dataset: chestmnist}}",
                             "data.max_train_samples=100"])
    back = load_config(dump_yaml(cfg, tmp_path / "c.yaml"))
    assert back == cfg
    assert to_dict(back)["data"]["extra_domains"]["chest"]["dataset"] == "chestmnist"


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "bad.yaml")


def test_every_shipped_experiment_config_loads() -> None:
    root = Path(__file__).resolve().parents[3] / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert files
    for path in files:
        assert isinstance(load_config(path), ExperimentConfig), path


def test_from_dict_int_is_accepted_for_float() -> None:
    cfg = from_dict(ExperimentConfig, {"clients": {"num_cpus": 2}})
    assert cfg.clients.num_cpus == 2.0 and isinstance(cfg.clients.num_cpus, float)


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, False),
    ({"strategy": {"name": "universal"}}, True),
    ({"pretrain": {"method": "mim"}}, True),
    ({"evaluation": {"baselines": ["fedavg", "universal"], "equal_budgets": False}}, True),
])
def test_dashboard_only_where_ray_train_runs(overrides: dict, expected: bool) -> None:
    cfg = from_dict(ExperimentConfig, {"strategy": {"name": "fedavg"}, **overrides})
    assert cfg.runs_train_jobs is expected
    assert load_config(None, ["run.dashboard=false"]).run.dashboard is False
    assert load_config(None).run.dashboard is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.name=fedavgg"], r"strategy\.name: unknown strategy 'fedavgg'; registered: "),
    (["data.domains=[breast,lung]"], r"data\.domains: unknown domain\(s\) \['lung'\]"),
    (["evaluation.baselines=[fedavg,fedsgd]"], r"evaluation\.baselines: unknown strategy"),
    (["evaluation.baselines=[fedavg,fedavg]"], r"evaluation\.baselines has duplicates"),
    (["data.domains=[breast,retina]", "evaluation.lodo_domains=[pneumonia]"],
     r"evaluation\.lodo_domains name domains that are not in data\.domains: \['pneumonia'\]"),
    (["strategy.name=universal", "strategy.proximal_mu=0.1"],
     r"\['strategy\.proximal_mu'\]: not option\(s\) of strategy 'universal'"),
    (["strategy.name=universal", "strategy.num_stages=9"], r"num_stages=9 exceeds the 8"),
    (["distill.temperature=0"], r"distill\.temperature must be > 0"),
    (["distill.num_workers=0"], r"distill\.num_workers must be >= 1"),
    (["run.checkpoint_every=0"], r"run\.checkpoint_every"),
    (["clients.num_actors=0"], r"clients\.num_actors must be >= 1"),
    (["train.lr=0"], r"lr > 0"),
    (["train.momentum=1.5"], r"train\.momentum must be in \[0, 1\)"),
    (["data.max_train_samples=0"], r"data\.max_train_samples must be > 0"),
    (["pretrain.method=mim", "model.arch=resnet18"], r"pretrain\.method=mim needs model\.arch"),
    (["evaluation.baseline_options={fedprox: {proximal_mu: 0.1}}"],
     r"baseline_options names strategies that are not baselines: \['fedprox'\]"),
    (["evaluation.baselines=[fedprox]", "evaluation.baseline_options={fedprox: {mu: 1}}"],
     r"evaluation\.baseline_options\.fedprox.*not option"),
    (["name=../../escape"], r"name: '\.\./\.\./escape' must be letters"),
    (["data.extra_domains={x: {source: kaggle}}"], r"data\.extra_domains: domain 'x'"),
])
def test_every_name_and_range_is_checked_at_load(overrides: list[str], message: str) -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, overrides)
        cfg.evaluation.baseline_strategy("fedprox", 2)  # baselines' own options, as the study
    assert time.perf_counter() - started < 1.0


def test_strategy_section_is_flat_and_round_trips() -> None:
    cfg = load_config(None, ["strategy.name=fedprox", "strategy.proximal_mu=0.2",
                             "strategy.rounds=3"])
    assert cfg.strategy.options.proximal_mu == 0.2 and cfg.planned_rounds() == 3
    assert to_dict(cfg)["strategy"] == {"name": "fedprox", "rounds": 3, "proximal_mu": 0.2,
                                        "fraction_fit": 1.0, "min_fit_clients": 0,
                                        "fraction_evaluate": 1.0, "min_evaluate_clients": 0}
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    base = load_config(None, ["evaluation.baselines=[fedprox]",
                              "evaluation.baseline_options={fedprox: {proximal_mu: 0.5}}"])
    assert base.evaluation.baseline_strategy("fedprox", 4).options.proximal_mu == 0.5
