"""What the Ray-free runtime needs from the layers above it, as typed protocols.

The round loop (:class:`~engine.fl.simulation.Simulation`) and the federated evaluations
drive a :class:`ClientPool` and hand strategies that distil a
:class:`~strategies.distill.DistillService`; the engine implements them on Ray
(``engine.cluster.pool.ActorPool``, ``engine.train.distill.RayTrainDistiller``), and a test
may implement them in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from engine.fl.failures import ClientFailure
from strategies.distill import DistillService
from strategies.types import ClientInfo


class ClientPool(Protocol):
    """Clients the server can ask to ``fit``, ``evaluate`` or ``finetune``."""

    def infos(self) -> dict[str, ClientInfo]:
        """Client id -> onboarding announcement."""
        ...

    def run(self, method: str, instructions: Mapping[str, Any],
            on_done: Callable[[], None] | None = None,
            on_submitted: Callable[[], object] | None = None
            ) -> tuple[dict[str, Any], dict[str, ClientFailure]]:
        """Call ``method`` on every client of ``instructions``; ``(results, failures)``."""
        ...


__all__ = ["ClientPool", "DistillService"]
