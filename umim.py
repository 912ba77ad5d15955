"""umim: a universal medical imaging model, trained by federated distillation on Ray.

The public Python API, re-exported from the engine (``engine``) and the strategies
(``strategies``) so that users never import their internals::

    import umim

    cfg = umim.load_config("experiments/quickstart.yaml", ["distill.temperature=2"])
    result = umim.run(cfg, out="runs/quick")
    result.history.to_pandas()          # the main run, round by round
    result.results.to_pandas()          # every method's test metrics
    result.summary["claim"]             # universal+ft vs the MIM base, paired test
    umim.resume("runs/quick")           # after a crash

    sweep = umim.sweep("experiments/sweeps/ci.yaml", out="runs/sweeps/ci")
    sweep.get_dataframe()               # Ray Tune's ResultGrid (sweep.grid), one row a trial
    sweep.summary["best_params"]        # the best completed trial's values
    sweep.load_study()                  # the live Optuna study (sweeps/<name>/optuna.db)

Doors for your own code (each reaches every process the engine starts):

* ``umim.register_encoder(name, factory, options=...)`` or ``model.arch: pkg.mod:factory``;
* ``umim.register_source(name, SourceClass)`` or ``source: pkg.mod:Class`` in a domain entry;
* ``@umim.register_strategy`` on a :class:`umim.Strategy` subclass with its own ``Options``
  dataclass, or ``strategy.name: pkg.mod:Class``.

``run``, ``resume`` and ``sweep`` are imported on first use (they bring in Ray).
"""

from __future__ import annotations

from typing import Any

from engine import __version__
from engine.config import ConfigError, ExperimentConfig, load_config
from engine.data.sources import Source, register_source
from engine.nn.models import MultiHeadNet, build_model, register_encoder
from strategies import (
    DistillService,
    DistillSettings,
    Strategy,
    StrategyContext,
    create_strategy,
    register_strategy,
)

__all__ = [
    "ConfigError",
    "DistillService",
    "DistillSettings",
    "ExperimentConfig",
    "MultiHeadNet",
    "Source",
    "Strategy",
    "StrategyContext",
    "__version__",
    "build_model",
    "create_strategy",
    "load_config",
    "register_encoder",
    "register_source",
    "register_strategy",
    "resume",  # noqa: F822 - imported on first use (see __getattr__)
    "run",  # noqa: F822
    "sweep",  # noqa: F822
]


def __getattr__(name: str) -> Any:
    if name in ("run", "resume"):
        from engine.run import study

        return getattr(study, name)
    if name == "sweep":
        from engine.tune import sweep

        return sweep
    raise AttributeError(f"module 'umim' has no attribute {name!r}")
