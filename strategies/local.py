"""Local-only training: every client trains its own model; nothing is shared."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from strategies.base import Strategy, StrategyContext
from strategies.types import FitRes, State


class LocalOnly(Strategy):
    """Each client starts from the initial encoder and keeps training its own model.

    The server only stores each client's model to hand it back next round (the engine's
    clients are stateless between rounds); no client ever sees another's weights.
    """

    name: ClassVar[str] = "local"

    def __init__(self, options: Any = None, context: StrategyContext | None = None) -> None:
        super().__init__(options, context)
        self.local: dict[str, State] = {}

    def client_state(self, cid: str) -> State:
        return dict(self.local.get(cid, self.encoder))

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        for cid, res in results.items():
            self.local[cid] = dict(res.state)
        return {"clients_trained": float(len(results)), "clients_failed": float(len(failures))}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "local": self.local}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.local = {cid: dict(s) for cid, s in state["local"].items()}
