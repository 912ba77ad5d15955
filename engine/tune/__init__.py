"""Sweeps: Ray Tune + Optuna over the universal strategy's knobs.

Each trial is a Tune *function trainable* that builds the experiment from the base config
plus the sampled values, starts its client actors, and runs the universal rounds; every
round reports the objective: the mean over all domains of the federated validation AUC of
the global model, a domain not scored yet counting at chance (what a trial holds and how
many fit at once is :func:`engine.cluster.resources.concurrent_trials`). The Optuna study
lives in ``optuna.db`` from the first trial, one intermediate value per round, stopped
trials ``PRUNED``. The modules, by job:

* :mod:`engine.tune.schema` -- the sweep file (:class:`SweepConfig`, :class:`SearchConfig`,
  :func:`load_sweep`) and the experiment of a trial (:func:`trial_config`);
* :mod:`engine.tune.space` -- search spaces declared in YAML, as Tune / Optuna spaces;
* :mod:`engine.tune.names` -- the metric names reported to Tune, the study's file;
* :mod:`engine.tune.objective` -- the objective, comparable across rounds and trials;
* :mod:`engine.tune.trial` -- the trainable and its Tune report callbacks;
* :mod:`engine.tune.search` -- the searcher: ``OptunaSearch`` on the live study;
* :mod:`engine.tune.driver` -- the ``Tuner`` and :func:`sweep`, the entry point;
* :mod:`engine.tune.outputs` -- ``trials.parquet``, ``best.yaml``, plots, ``summary.json``;
* :mod:`engine.tune.result` -- :class:`SweepResult`, what :func:`sweep` returns.

The names below are imported on first use, so ``import engine.tune`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.tune.driver import sweep
    from engine.tune.outputs import write_outputs
    from engine.tune.result import SweepResult
    from engine.tune.schema import SearchConfig, SweepConfig, load_sweep, trial_config

_HOMES = {
    "sweep": "engine.tune.driver",
    "load_sweep": "engine.tune.schema",
    "SweepConfig": "engine.tune.schema",
    "SearchConfig": "engine.tune.schema",
    "trial_config": "engine.tune.schema",
    "write_outputs": "engine.tune.outputs",
    "SweepResult": "engine.tune.result",
}

__all__ = [
    "SearchConfig",
    "SweepConfig",
    "SweepResult",
    "load_sweep",
    "sweep",
    "trial_config",
    "write_outputs",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'engine.tune' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
