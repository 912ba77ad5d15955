"""What users registered in the driver, carried to every process the engine starts.

A strategy, encoder or data source registered by a call (``umim.register_strategy``,
``umim.register_encoder``, ``umim.register_source``) lives in the registries of the process
that made the call. The engine captures those registrations when a run starts
(:meth:`Plugins.capture`) and installs them first thing in each client actor, Ray Train
worker and Tune trial (:meth:`Plugins.install`); Ray pickles them (by value when they were
defined in a notebook or ``__main__``). Names given as import paths
(``package.module:name``) need no capture: every process imports them itself, so the package
must be importable there (a local Ray inherits the driver's ``sys.path``, see
``engine.cluster.connect``; on a cluster, install the package on every node).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.data.sources import registry as sources
from engine.nn.models import ENCODERS, EncoderSpec
from strategies.factory import STRATEGIES

BUILTIN_SOURCES = ("medmnist", "mednist", "folder", "npz")


@dataclass(frozen=True)
class Plugins:
    """Registrations made by calls, by registry."""

    strategies: Mapping[str, type] = field(default_factory=dict)
    encoders: Mapping[str, EncoderSpec] = field(default_factory=dict)
    sources: Mapping[str, type] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> Plugins:
        """The registrations of this process that did not ship with umim."""
        return cls(strategies=STRATEGIES.user(), encoders=ENCODERS.user(),
                   sources={k: v for k, v in sources.SOURCES.items()
                            if k not in BUILTIN_SOURCES})

    def install(self) -> None:
        """Register everything here in this process (idempotent)."""
        for name, cls in self.strategies.items():
            STRATEGIES.register(name, cls)
        for name, spec in self.encoders.items():
            ENCODERS.register(name, spec)
        for name, source in self.sources.items():
            sources.register_source(name, source, replace=True)

    def __bool__(self) -> bool:
        return bool(self.strategies or self.encoders or self.sources)


def install(plugins: Any) -> None:
    """Install ``plugins`` if given (a :class:`Plugins` or ``None``)."""
    if plugins is not None:
        plugins.install()
