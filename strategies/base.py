"""The strategy interface the engine's round loop drives."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from strategies.distill import DistillService, DistillSettings
from strategies.sampling import ClientSampling
from strategies.state import heads_of
from strategies.types import ClientInfo, EvaluateIns, FitIns, FitRes, State


@dataclass(frozen=True)
class NoOptions:
    """The options of a strategy that declares none."""


@dataclass(frozen=True)
class StrategyContext:
    """What the engine hands every strategy besides its own options.

    Attributes
    ----------
    seed
        The run seed.
    distill
        The experiment's distillation objective (``distill.*``), for strategies that distil.
    transfer
        What a client may return (``privacy.transfer``): ``weights`` or ``predictions``
        (its outputs on the public pool only; for strategies that declare ``predicts``).
    sampling
        How many clients take part in each round (``strategy.fraction_fit`` and co.).
    """

    seed: int = 0
    distill: DistillSettings = field(default_factory=DistillSettings)
    transfer: str = "weights"
    sampling: ClientSampling = field(default_factory=ClientSampling)


class Strategy(ABC):
    """Decides what each client is asked to do and how the results combine.

    The engine calls, per round: :meth:`configure_fit`, the clients' ``fit``,
    :meth:`aggregate_fit`, then :meth:`configure_evaluate` and the clients' ``evaluate``.
    A strategy keeps the server's state (the global encoder, and each client's head, which
    the client gets back every round) and exposes it through :meth:`state_dict` for
    checkpoints.

    A strategy declares what it needs, and the engine provides it without knowing the
    strategy's name:

    * ``name``: its registry name;
    * ``Options``: a frozen dataclass of its own ``strategy.*`` config keys (validated when
      the config loads; unknown keys are errors naming the strategy);
    * ``pooled``: it trains one client holding every domain's pooled training data (an
      oracle no real deployment may use), so the engine starts that client;
    * ``distils``: it distils on the server, so the engine binds a
      :class:`~strategies.distill.DistillService` to :attr:`distiller` (a Ray Train job)
      before the first round;
    * ``predicts``: it can learn from the clients' outputs on the public pool instead of
      their weights (``privacy.transfer: predictions``; :meth:`check_transfer`);
    * ``heterogeneous``: it honours a client's declared encoder family
      (:attr:`~strategies.types.ClientInfo.arch`, ``model.domain_arch``);
    * :meth:`planned_rounds`: how many rounds a run of it has, known before it starts
      (for checkpoints, progress and a sweep scheduler's horizon);
    * :meth:`client_epochs`: its training budget, the epochs each client trains over the
      whole run (the study gives every compared arm the same one, see
      :meth:`rounds_for_budget`).
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    pooled: ClassVar[bool] = False
    distils: ClassVar[bool] = False
    predicts: ClassVar[bool] = False
    heterogeneous: ClassVar[bool] = False
    DECLARATIONS: ClassVar[tuple[str, ...]] = ("pooled", "distils", "predicts",
                                               "heterogeneous")
    """The flags a strategy declares (what :meth:`describe` reports under ``declares``)."""

    def __init__(self, options: Any = None, context: StrategyContext | None = None) -> None:
        self.options = self.Options() if options is None else options
        if not isinstance(self.options, self.Options):
            raise TypeError(f"strategy {self.name!r} takes {self.Options.__name__} options, "
                            f"got {type(self.options).__name__}")
        self.context = context or StrategyContext()
        self.check_transfer(self.options, self.context.transfer)  # the config checked it too
        self.distiller: DistillService | None = None
        self.clients: dict[str, ClientInfo] = {}
        self.encoder: State = {}
        self.heads: dict[str, State] = {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What the strategy declares, as plain data (``umim strategies`` prints it): its
        name, one-line doc, ``declares`` (each flag of :attr:`DECLARATIONS`) and its options
        with their defaults."""
        doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        options = {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(cls.Options()).items()}
        return {"name": cls.name, "doc": doc,
                "declares": {flag: bool(getattr(cls, flag)) for flag in cls.DECLARATIONS},
                "options": options}

    @classmethod
    def check_transfer(cls, options: Any, transfer: str, *, heterogeneous: bool = False
                       ) -> None:
        """Raise ``ValueError`` (one line) when the strategy cannot run with these options
        under ``privacy.transfer`` = ``transfer``, or, with ``heterogeneous``, with clients
        of several encoder families (``model.domain_arch``); checked when the config loads."""
        if transfer == "predictions" and not cls.predicts:
            raise ValueError(f"strategy {cls.name!r} needs the clients' weights; it cannot "
                             "run with privacy.transfer=predictions")
        if heterogeneous and not cls.heterogeneous:
            raise ValueError(f"strategy {cls.name!r} trains one encoder family at every "
                             "client; it cannot run with model.domain_arch")

    @classmethod
    def planned_rounds(cls, options: Any, domains: Sequence[str], rounds: int) -> int:
        """Rounds of a run over ``domains`` (``strategy.rounds`` unless the strategy plans)."""
        return rounds

    @classmethod
    def epochs_per_round(cls, options: Any, local_epochs: int) -> int:
        """Epochs a client trains in one round it takes part in (``train.local_epochs``
        unless the strategy's options set their own ``local_epochs``)."""
        return int(getattr(options, "local_epochs", None) or local_epochs)

    @classmethod
    def client_epochs(cls, options: Any, domains: Sequence[str], rounds: int,
                      local_epochs: int) -> int:
        """The budget: epochs each client trains over a whole run (every client takes
        part in every round unless the strategy says otherwise)."""
        return cls.planned_rounds(options, domains, rounds) \
            * cls.epochs_per_round(options, local_epochs)

    @classmethod
    def rounds_for_budget(cls, options: Any, domains: Sequence[str], budget: int,
                          local_epochs: int) -> int | None:
        """``strategy.rounds`` giving each client ``budget`` epochs, or ``None`` when no
        whole number of rounds does."""
        per_round = cls.epochs_per_round(options, local_epochs)
        if budget % per_round:
            return None
        rounds = budget // per_round
        if cls.client_epochs(options, domains, rounds, local_epochs) != budget:
            return None  # the strategy plans its own rounds
        return rounds

    def num_rounds(self, configured: int) -> int:
        """How many rounds this run has (after :meth:`initialize`)."""
        domains = list(dict.fromkeys(d for c in self.clients.values() for d in c.domains))
        return self.planned_rounds(self.options, domains, configured)

    def initialize(self, clients: Sequence[ClientInfo], encoder: State) -> None:
        """Onboard ``clients`` with the initial global ``encoder`` (random or pretrained)."""
        self.clients = {c.cid: c for c in clients}
        self.encoder = dict(encoder)
        self.heads = {}

    # -- what clients are asked ----------------------------------------------------------
    def client_state(self, cid: str) -> State:
        """The model a client receives: the global encoder and its own head(s), if any."""
        return {**self.encoder, **self.heads.get(cid, {})}

    def fit_candidates(self, server_round: int, cids: Sequence[str]) -> list[str]:
        """The clients that may train in this round (all of ``cids`` by default)."""
        return list(cids)

    def sample_fit(self, server_round: int, cids: Sequence[str]) -> list[str]:
        """The clients that train in this round: a seeded sample
        (:class:`~strategies.sampling.ClientSampling`) of :meth:`fit_candidates`."""
        return self.context.sampling.fit(self.fit_candidates(server_round, cids),
                                         seed=self.context.seed, server_round=server_round)

    def sample_evaluate(self, server_round: int, cids: Sequence[str]) -> list[str]:
        """The clients that score the model in this round's federated val evaluation."""
        return self.context.sampling.evaluate(cids, seed=self.context.seed,
                                              server_round=server_round)

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
