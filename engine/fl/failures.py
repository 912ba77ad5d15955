"""Why a client returned nothing in a round (Ray-free, shared by the pool and the round
loop)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientFailure:
    """Why a client returned no result: ``kind`` is ``timeout`` (no result within
    ``clients.task_timeout_s``, also after retries), ``actor_died`` (its actor crashed and
    was not back in time, or retries ran out), ``task_error`` (the client's code raised) or
    ``nonfinite_update`` (set by the round loop for a NaN/Inf update)."""

    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"
