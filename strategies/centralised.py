"""Centralised oracle: one model trained on every domain's pooled labelled data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from strategies.base import Strategy
from strategies.state import encoder_of, heads_of
from strategies.types import POOLED_CID, FitRes, State


class Centralised(Strategy):
    """Centralised oracle on pooled labelled data: an upper bound, never a deployment.

    The engine pools all clients' training data into one client (``pooled``) that trains
    the shared encoder with every domain's head. Each real client then scores the global
    model with its domain's head on its own data.
    """

    name: ClassVar[str] = "centralised"
    pooled: ClassVar[bool] = True

    def client_state(self, cid: str) -> State:
        shared = self.heads.get(POOLED_CID, {})
        return {**self.encoder, **heads_of(shared, self.clients[cid].domains)}

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        if POOLED_CID not in results:
            raise ValueError(f"round {server_round}: the pooled client failed: "
                             f"{failures.get(POOLED_CID, 'no result')}")
        state = results[POOLED_CID].state
        self.encoder = encoder_of(state)
        self.heads[POOLED_CID] = heads_of(state)
        return {"pooled_examples": float(results[POOLED_CID].num_examples)}
