"""A sweep's settings as frozen dataclasses, read from YAML, and the experiment of a trial.

A sweep file names a base experiment, fixed overrides of it, a search space (see
:mod:`engine.tune.space`) and the search settings::

    name: ci
    experiment: ../quickstart.yaml
    overrides: {distill.steps: 20}
    space: {distill.temperature: {loguniform: [0.5, 8]}}
    search: {num_samples: 4, scheduler: asha}

Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from engine.config import ExperimentConfig, from_dict
from engine.config.loader import ConfigError, apply_overrides, load_yaml, set_dotted
from engine.tune.space import check_keys, check_point, validate_space


@dataclass(frozen=True)
class SearchConfig:
    """How trials are drawn, scheduled and run in parallel.

    Attributes
    ----------
    num_samples
        Number of trials.
    seed
        Seed of Optuna's sampler (TPE).
    max_concurrent_trials
        Trials at once; ``None`` derives it from the resources one trial needs (its client
        actors and Train workers) and the cluster's size.
    scheduler
        ``asha`` (early stopping on the objective) or ``none``.
    grace_period, reduction_factor
        ASHA's first milestone (in rounds) and halving rate.
    include_default
        Make the first trial the base experiment's own values, so the summary can say how
        much the best trial beat the default config.
    points_to_evaluate
        Configurations to run next (after the default), before the sampler draws: each maps
        some keys of the space to values; the other keys keep the base experiment's value.
    """

    num_samples: int = 20
    seed: int = 0
    max_concurrent_trials: int | None = None
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: float = 1.0
    reduction_factor: float = 2.0
    include_default: bool = True
    points_to_evaluate: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("search.num_samples must be >= 1")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError("search.max_concurrent_trials must be >= 1")
        fixed = int(self.include_default) + len(self.points_to_evaluate)
        if fixed > self.num_samples:
            raise ValueError(f"search.num_samples ({self.num_samples}) is smaller than the "
                             f"{fixed} configurations given to evaluate first")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: base experiment, fixed overrides, search space and search settings.

    ``experiment`` is a path relative to the sweep file (or absolute). Trials run the base
    experiment's main strategy only (evaluation extras are switched off) with client
    updates cached across trials (``run.cache_fits``).
    """

    name: str = "sweep"
    experiment: str = "../quickstart.yaml"
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    space: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    search: SearchConfig = field(default_factory=SearchConfig)
    storage_path: str = "runs/sweeps"


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()
               ) -> tuple[SweepConfig, dict[str, Any]]:
    """Read a sweep file (plus dotted overrides) and build the trials' base experiment.

    Parameters
    ----------
    path
        The sweep YAML.
    overrides
        Dotted overrides of the sweep file (``search.num_samples=8``).

    Returns
    -------
    tuple of SweepConfig and dict
        The sweep config and the trial base config as plain data.

    Raises
    ------
    ConfigError
        An unknown key, an empty or malformed space, a point outside the space, or an
        invalid base experiment.
    """
    path = Path(path)
    sweep = from_dict(SweepConfig, apply_overrides(load_yaml(path), overrides))
    if not sweep.space:
        raise ConfigError(f"{path}: the sweep has an empty space")
    validate_space(sweep.space)
    for i, point in enumerate(sweep.search.points_to_evaluate):
        check_point(sweep.space, point, f"search.points_to_evaluate[{i}]")
    experiment = Path(sweep.experiment)
    if not experiment.is_absolute():
        experiment = (path.parent / experiment).resolve()
    base = load_yaml(experiment)
    for key, value in sweep.overrides.items():
        set_dotted(base, key, copy.deepcopy(value))
    set_dotted(base, "evaluation", {"finetune_epochs": 0, "lodo_domains": [], "baselines": []})
    check_keys(sweep.space, ExperimentConfig, base)
    set_dotted(base, "run.cache_fits", True)
    from_dict(ExperimentConfig, base)  # the base itself must be valid
    return sweep, base


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment of one trial: the base with the sampled values set.

    Parameters
    ----------
    base
        The trial base config as plain data (see :func:`load_sweep`); not modified.
    params
        Dotted experiment key -> sampled value.

    Returns
    -------
    ExperimentConfig
        The validated experiment.
    """
    data = copy.deepcopy(dict(base))
    for key, value in params.items():
        set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def get_dotted(data: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted ``key`` (``distill.beta``) of nested mappings.

    Raises
    ------
    KeyError
        A part of the key is missing.
    """
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node
