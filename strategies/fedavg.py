"""FedAvg over the shared encoder; each client's head stays its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from strategies.aggregate import select, weighted_average
from strategies.base import ENCODER, HEADS, Strategy
from strategies.types import FitRes


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017) of the encoder, weighted by sample count.

    The domains' label spaces differ, so heads are never averaged: every client keeps the
    head it trained (the server stores it only to hand it back next round).
    """

    name: ClassVar[str] = "fedavg"

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        cids = sorted(results)
        if not cids:
            raise ValueError(f"round {server_round}: no client result to aggregate")
        states = [results[c].state for c in cids]
        self.encoder = weighted_average(states, [results[c].num_examples for c in cids],
                                        keys=select(states[0], ENCODER).keys())
        for cid in cids:
            self.heads[cid] = select(results[cid].state, HEADS)
        return {"clients_aggregated": float(len(cids)), "clients_failed": float(len(failures))}
