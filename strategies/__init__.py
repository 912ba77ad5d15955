"""umim strategies: what clients are asked to do and how their results combine.

Nothing in this package imports Ray; the engine runs strategies, never the reverse.
"""

from strategies.aggregate import nonfinite_keys, weighted_average
from strategies.base import Strategy
from strategies.registry import STRATEGIES, create_strategy, register_strategy
from strategies.types import (
    ClientInfo,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    State,
    TaskType,
)

__all__ = [
    "STRATEGIES",
    "ClientInfo",
    "EvaluateIns",
    "EvaluateRes",
    "FitIns",
    "FitRes",
    "State",
    "Strategy",
    "TaskType",
    "create_strategy",
    "nonfinite_keys",
    "register_strategy",
    "weighted_average",
]
