"""umim strategies: what clients are asked to do and how their results combine.

Nothing in this package imports Ray or the engine; the engine runs strategies, never the
reverse. A strategy declares what it needs (its ``Options``, ``pooled``, ``distils``,
``planned_rounds``) and the engine provides it.
"""

from strategies.aggregate import nonfinite_keys, weighted_average
from strategies.base import NoOptions, Strategy, StrategyContext
from strategies.distill import LOSS_NAMES, LOSS_TERMS, DistillService, DistillSettings
from strategies.factory import STRATEGIES, create_strategy, register_strategy, resolve_strategy
from strategies.registry import Registry, load_object
from strategies.types import (
    POOLED_CID,
    ClientInfo,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    State,
    TaskType,
)

__all__ = [
    "LOSS_NAMES",
    "LOSS_TERMS",
    "POOLED_CID",
    "STRATEGIES",
    "ClientInfo",
    "DistillService",
    "DistillSettings",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "NoOptions",
    "Registry",
    "State",
    "Strategy",
    "StrategyContext",
    "TaskType",
    "create_strategy",
    "load_object",
    "nonfinite_keys",
    "register_strategy",
    "resolve_strategy",
    "weighted_average",
]
