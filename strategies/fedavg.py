"""FedAvg over the shared encoder; each client's head stays its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from strategies.aggregate import weighted_average
from strategies.base import Strategy
from strategies.state import encoder_of, head_of
from strategies.types import FitRes, State


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017) of the encoder, weighted by sample count.

    The domains' label spaces differ, so a head is only ever averaged among the clients of
    its own domain (with one client per domain it simply stays that client's own); the
    server stores it to hand it back next round. With one domain split over many clients
    this is plain FedAvg of the whole model.
    """

    name: ClassVar[str] = "fedavg"

    def client_state(self, cid: str) -> State:
        return {**self.encoder, **{k: v for d in self.clients[cid].domains
                                   for k, v in self.heads.get(d, {}).items()}}

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        cids = sorted(results)
        if not cids:
            raise ValueError(f"round {server_round}: no client result to aggregate")
        states = [results[c].state for c in cids]
        weights = [results[c].num_examples for c in cids]
        self.encoder = weighted_average(states, weights, keys=encoder_of(states[0]).keys())
        domains = sorted({d for c in cids for d in self.clients[c].domains})
        for domain in domains:
            members = [i for i, c in enumerate(cids) if domain in self.clients[c].domains]
            self.heads[domain] = weighted_average(
                [states[i] for i in members], [weights[i] for i in members],
                keys=head_of(states[members[0]], domain).keys())
        return {"clients_aggregated": float(len(cids)), "clients_failed": float(len(failures))}
