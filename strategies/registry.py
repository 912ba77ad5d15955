"""The strategy registry and its one factory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.base import Strategy
from strategies.centralised import Centralised
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx
from strategies.local import LocalOnly
from strategies.universal import Universal

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Universal, FedAvg, FedProx, LocalOnly, Centralised)
}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``."""
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(name: str, options: Mapping[str, Any]) -> Strategy:
    """Instantiate strategy ``name`` with the ``options`` it declares it takes."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; registered: {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    missing = [k for k in cls.options if k not in options]
    if missing:
        raise ValueError(f"strategy {name!r} needs option(s) {missing}")
    return cls(**{k: options[k] for k in cls.options})
