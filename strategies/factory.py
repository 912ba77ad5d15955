"""The strategy registry and its one factory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies.base import Strategy, StrategyContext
from strategies.centralised import Centralised
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx
from strategies.local import LocalOnly
from strategies.registry import Registry
from strategies.universal import Universal

STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy", "umim.strategies",
    {cls.name: cls for cls in (Universal, FedAvg, FedProx, LocalOnly, Centralised)})
"""Every registered strategy by name (``umim strategies`` lists them)."""


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry under ``cls.name``.

    A strategy registered this way in the driver is installed in every process the engine
    starts (see ``engine.config.plugins``); one named by import path
    (``strategy.name: mypkg.strategies:MyStrategy``) is imported wherever it is needed.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"register_strategy takes a Strategy subclass, got {cls!r}")
    STRATEGIES.register(cls.name, cls)
    return cls


def resolve_strategy(name: str) -> type[Strategy]:
    """The strategy class named ``name`` (registered, import path or entry point)."""
    cls = STRATEGIES.resolve(name)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"strategy {name!r} resolves to {cls!r}, not a Strategy subclass")
    return cls


def create_strategy(name: str, options: Any = None,
                    context: StrategyContext | None = None) -> Strategy:
    """Instantiate strategy ``name`` with its options (an instance of its ``Options``, or a
    mapping of them) and the engine's :class:`~strategies.base.StrategyContext`."""
    cls = resolve_strategy(name)
    if options is None or isinstance(options, Mapping):
        try:
            options = cls.Options(**dict(options or {}))
        except TypeError as err:
            raise ValueError(f"strategy {name!r}: {err}") from err
    return cls(options, context)
