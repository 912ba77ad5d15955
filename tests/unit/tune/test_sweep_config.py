from __future__ import annotations

from pathlib import Path

import pytest

from engine.cluster.resources import ResourceError, concurrent_trials, trial_resources
from engine.config.loader import ConfigError
from engine.tune.schema import load_sweep, trial_config
from engine.tune.space import tune_space

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["ci", "cpu", "universal"])
def test_shipped_sweeps_load(name: str) -> None:
    sweep, base = load_sweep(REPO / "experiments" / "sweeps" / f"{name}.yaml")
    assert sweep.name == name and sweep.space
    assert base["evaluation"] == {"finetune_epochs": 0, "lodo_domains": [], "baselines": []}
    assert base["run"]["cache_fits"] is True
    params = {"distill.temperature": 2.0, "distill.weighting": "uniform",
              "pretrain.method": "none"}
    cfg = trial_config(base, params)
    assert cfg.distill.temperature == 2.0 and cfg.pretrain.method == "none"


def test_ci_sweep_fits_two_trials_on_two_cores() -> None:
    _, base = load_sweep(REPO / "experiments" / "sweeps" / "ci.yaml")
    cfg = trial_config(base, {})
    assert trial_resources(cfg) == (1.0, 0.0)
    assert concurrent_trials(cfg, [{"CPU": 2.0}]) == 2
    with pytest.raises(ResourceError, match="one sweep trial needs"):
        concurrent_trials(cfg, [{"CPU": 0.5}])


def test_tune_space_kinds() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = tune_space({"distill.temperature": {"loguniform": [0.5, 8]},
                        "distill.beta": {"uniform": [0, 2]},
                        "distill.steps": {"randint": [10, 20]},
                        "distill.weighting": {"choice": ["uniform", "confidence"]}})
    assert isinstance(space["distill.temperature"], Float)
    assert space["distill.temperature"].lower == 0.5
    assert isinstance(space["distill.steps"], Integer)
    assert isinstance(space["distill.weighting"], Categorical)


@pytest.mark.parametrize(("space", "message"), [
    ({"distill.temprature": {"uniform": [0, 1]}}, "unknown config key 'temprature'"),
    ({"distill": {"uniform": [0, 1]}}, "names a whole section"),
    ({"distill.beta": {"normal": [0, 1]}}, "unknown distribution"),
    ({"distill.beta": {"loguniform": [0, 1]}}, "bad bounds"),
    ({"distill.beta": {"uniform": [1]}}, r"needs \[low, high\]"),
    ({"distill.beta": 0.5}, "expected a mapping"),
])
def test_bad_spaces(tmp_path: Path, space: dict, message: str) -> None:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"experiment": str(REPO / "experiments" / "quickstart.yaml"),
                                    "space": space}))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


@pytest.mark.parametrize(("search", "message"), [
    ({"points_to_evaluate": [{"distill.gamma": 0.5}]}, "'distill.gamma' is not in the space"),
    ({"points_to_evaluate": [{"distill.beta": 3.0}]}, r"3.0 is outside uniform \[0, 2\]"),
    ({"points_to_evaluate": [{"distill.weighting": "max"}]}, "'max' is outside choice"),
    ({"points_to_evaluate": [{"distill.beta": 1.0}], "num_samples": 1}, "smaller than the 2"),
])
def test_bad_points_to_evaluate(tmp_path: Path, search: dict, message: str) -> None:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": str(REPO / "experiments" / "quickstart.yaml"),
        "space": {"distill.beta": {"uniform": [0, 2]},
                  "distill.weighting": {"choice": ["uniform", "confidence"]}},
        "search": search}))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_points_to_evaluate_load(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": str(REPO / "experiments" / "quickstart.yaml"),
        "space": {"distill.beta": {"uniform": [0, 2]}},
        "search": {"points_to_evaluate": [{"distill.beta": 1.5}, {}]}}))
    sweep, _ = load_sweep(path)
    assert [dict(p) for p in sweep.search.points_to_evaluate] == [{"distill.beta": 1.5}, {}]


def test_unknown_sweep_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("experiment: x.yaml\nsearch:\n  samples: 3\n")
    with pytest.raises(ConfigError, match=r"search\.samples"):
        load_sweep(path)


def test_planned_rounds_follow_the_strategys_stage_plan() -> None:
    from engine.config import ExperimentConfig, from_dict

    domains = ["breast", "pneumonia", "retina"]
    explicit = from_dict(ExperimentConfig, {
        "data": {"domains": domains},
        "strategy": {"name": "universal", "stages": [["breast"], ["pneumonia"], ["retina"]],
                     "num_stages": 2, "rounds_per_stage": 2}})
    assert explicit.planned_rounds() == 6  # three explicit stages, not num_stages=2
    chunks = from_dict(ExperimentConfig, {"data": {"domains": domains},
                                          "strategy": {"name": "universal", "num_stages": 2}})
    assert chunks.planned_rounds() == 2
    fedavg = from_dict(ExperimentConfig, {"strategy": {"name": "fedavg", "rounds": 4}})
    assert fedavg.planned_rounds() == 4


def test_concurrency_is_counted_node_by_node() -> None:
    from engine.config import load_config

    # 4 actors of 1 CPU + a 1-CPU distillation worker: 5 CPUs per trial
    cfg = load_config(None, ["strategy.name=universal", "data.domains=[breast,pneumonia,"
                             "retina,pathology]", "clients.num_actors=4"])
    assert trial_resources(cfg) == (5.0, 0.0)
    assert concurrent_trials(cfg, [{"CPU": 10.0}]) == 2
    # ten CPUs in all, but no node holds an actor of 3 CPUs next to another
    big = load_config(None, ["clients.num_cpus=3", "data.domains=[breast,pneumonia]"])
    assert concurrent_trials(big, [{"CPU": 6.0}]) == 1
    with pytest.raises(ResourceError, match="cannot place"):
        concurrent_trials(big, [{"CPU": 2.0}] * 5)
    # fractional GPUs never span two devices: 0.6 + 0.6 needs two GPUs
    gpu = load_config(None, ["clients.num_gpus=0.6", "data.domains=[breast,pneumonia]"])
    assert concurrent_trials(gpu, [{"CPU": 16.0, "GPU": 2.0}]) == 1
    assert concurrent_trials(gpu, [{"CPU": 16.0, "GPU": 4.0}]) == 2
