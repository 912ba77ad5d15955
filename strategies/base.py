"""The strategy interface the engine's round loop drives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from strategies.aggregate import select
from strategies.types import ClientInfo, EvaluateIns, FitIns, FitRes, State

ENCODER = "encoder."
HEADS = "heads."


def heads_of(state: Mapping[str, Any], domains: Sequence[str]) -> State:
    """The head tensors of ``domains`` in ``state``."""
    return {k: v for d in domains for k, v in select(state, f"{HEADS}{d}.").items()}


class Strategy(ABC):
    """Decides what each client is asked to do and how the results combine.

    The engine calls, per round: :meth:`configure_fit`, the clients' ``fit``,
    :meth:`aggregate_fit`, then :meth:`configure_evaluate` and the clients' ``evaluate``.
    A strategy keeps the server's state (the global encoder, and each client's head, which
    the client gets back every round) and exposes it through :meth:`state_dict` for
    checkpoints. Subclasses set ``name``; ``options`` lists the ``strategy.*`` config keys
    passed to ``__init__``; ``pooled`` strategies train one client holding every domain's
    pooled training data (an oracle no real deployment may use).
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    pooled: ClassVar[bool] = False

    def __init__(self) -> None:
        self.clients: dict[str, ClientInfo] = {}
        self.encoder: State = {}
        self.heads: dict[str, State] = {}

    def num_rounds(self, configured: int) -> int:
        """How many rounds the run has (``strategy.rounds`` unless the strategy decides)."""
        return configured

    def initialize(self, clients: Sequence[ClientInfo], encoder: State) -> None:
        """Onboard ``clients`` with the initial global ``encoder`` (random or pretrained)."""
        self.clients = {c.cid: c for c in clients}
        self.encoder = dict(encoder)
        self.heads = {}

    # -- what clients are asked ----------------------------------------------------------
    def client_state(self, cid: str) -> State:
        """The model a client receives: the global encoder and its own head(s), if any."""
        return {**self.encoder, **self.heads.get(cid, {})}

    def fit_config(self, server_round: int, cid: str) -> dict[str, Any]:
        """Per-client training options for this round (none by default)."""
        return {}

    def configure_fit(self, server_round: int, cids: Sequence[str]) -> dict[str, FitIns]:
        """One :class:`FitIns` per selected client."""
        out = {}
        for cid in cids:
            state = self.client_state(cid)
            fresh = tuple(d for d in self.clients[cid].domains
                          if not heads_of(state, [d]))
            out[cid] = FitIns(state=state, fresh_heads=fresh,
                              config=self.fit_config(server_round, cid))
        return out

    @abstractmethod
    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        """Fold the valid client results of a round into the server state.

        ``results`` hold only finite updates (the engine rejects the rest and lists them
        in ``failures`` with the reason). Returns server-side scalar metrics.
        """

    def configure_evaluate(self, server_round: int, cids: Sequence[str], split: str
                           ) -> dict[str, EvaluateIns]:
        """The model each client scores on its own ``split``.

        A client that has no head yet for one of its domains (its only update so far was
        rejected) has no model to score and is skipped.
        """
        out = {}
        for cid in cids:
            state = self.client_state(cid)
            if all(heads_of(state, [d]) for d in self.clients[cid].domains):
                out[cid] = EvaluateIns(state=state, split=split)
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run (tensors and plain data)."""
        return {"encoder": self.encoder, "heads": self.heads}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.encoder = dict(state["encoder"])
        self.heads = {cid: dict(h) for cid, h in state["heads"].items()}
