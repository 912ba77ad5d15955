"""The universal strategy: clients fine-tune, the server distils them into one global model.

Per round of stage ``s`` (domains join in stages):

1. **Onboard**: every client of stage ``s`` receives the current global encoder and its
   domain's global head (a fresh head the first time).
2. **Local training**: it fine-tunes encoder and head on its private train split, keeping
   the epoch with the best private val AUC.
3. **Transfer**: it returns the fine-tuned weights (the teacher); nothing else, unless
   ``strategy.relevance`` asks each client for one score per public pool image (how much
   it looks like the client's own data), which its teachers then carry as sample weights.
   With ``privacy.transfer: predictions`` the teacher stays home: the client returns its
   outputs on the public pool instead (features and every domain head's logits, one pass),
   and the distillation trains on those rows.
   A client that declares its own encoder family (``model.domain_arch``) trains a fresh
   model of that family instead of the global encoder; its teacher is built in that family
   (weights) or only its outputs are used (predictions).
4. **Distil**: the server's distiller (Ray Train, provided by the engine) trains the global
   student, one shared encoder and one head per domain, on the unlabelled pool against the
   teachers, with feature matching and retention of the previous global model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from strategies.aggregate import weighted_average
from strategies.base import Strategy, StrategyContext
from strategies.distill import DistillRequest, Teacher
from strategies.state import encoder_of, head_of, heads_of
from strategies.types import ClientInfo, FitIns, FitRes, State


def teachers_from(results: Mapping[str, FitRes], infos: Mapping[str, ClientInfo], *,
                  relevance: bool = False) -> list[Teacher]:
    """One teacher per client and domain: the client's encoder and that domain's head (in
    the client's declared encoder family), or, for a result with ``pool_outputs``
    (``privacy.transfer: predictions``), its outputs on the pool; weighted by the client's
    number of training examples; with ``relevance``, carrying the client's pool scores as
    its ``sample_weights``.

    Raises
    ------
    ValueError
        With ``relevance``, for a result without pool scores.
    """
    teachers = []
    for cid in sorted(results):
        info, res = infos[cid], results[cid]
        state = res.state
        if relevance and res.pool_scores is None:
            raise ValueError(f"client {cid} returned no pool scores, which "
                             "strategy.relevance=true asks every client for")
        for domain in info.domains:
            weights = ({} if res.pool_outputs is not None
                       else {**encoder_of(state), **head_of(state, domain)})
            teachers.append(Teacher(cid=cid, domain=domain, task=info.tasks[domain],
                                    num_classes=info.num_classes[domain], state=weights,
                                    weight=float(res.num_examples),
                                    sample_weights=res.pool_scores if relevance else None,
                                    outputs=res.pool_outputs, arch=info.arch))
    return teachers


def merged_encoder(teachers: Sequence[Teacher]) -> State:
    """The weight average of the teachers' encoders (one per client, weighted by its
    training examples): a one-shot FedAvg of the round, used as a student's start.

    Raises
    ------
    ValueError
        For teachers given as pool outputs or of another encoder family (nothing to
        average into the global encoder).
    """
    foreign = sorted({t.cid for t in teachers if t.outputs is not None or t.arch is not None})
    if foreign:
        raise ValueError(f"strategy.student_init=merged: teachers {foreign} carry no weights "
                         "of the global encoder's family to average")
    by_client = {t.cid: t for t in teachers}
    parts = [by_client[c] for c in sorted(by_client)]
    return weighted_average([encoder_of(t.state) for t in parts], [t.weight for t in parts])


def plan_stages(domains: Sequence[str], stages: Sequence[Sequence[str]], num_stages: int
                ) -> list[list[str]]:
    """The domains of each stage: ``stages`` if given, else ``num_stages`` even chunks."""
    if stages:
        flat = [d for stage in stages for d in stage]
        if sorted(flat) != sorted(domains) or len(set(flat)) != len(flat):
            raise ValueError(f"strategy.stages must list every domain exactly once; got "
                             f"{[list(s) for s in stages]} for domains {list(domains)}")
        return [list(stage) for stage in stages]
    if num_stages > len(domains):
        raise ValueError(f"strategy.num_stages={num_stages} exceeds the {len(domains)} domains")
    bounds = [round(i * len(domains) / num_stages) for i in range(num_stages + 1)]
    return [list(domains[bounds[i]:bounds[i + 1]]) for i in range(num_stages)]


@dataclass(frozen=True)
class UniversalOptions:
    """The universal strategy's ``strategy.*`` keys.

    Attributes
    ----------
    stages
        Explicit domain lists, one per stage (e.g. ``[[breast, retina], [...]]``); empty
        means ``num_stages`` consecutive chunks of ``data.domains``.
    num_stages, rounds_per_stage
        How many stages, and rounds (fine-tune + distil) within each.
    local_epochs
        Epochs of local fine-tuning per round (``None``: ``train.local_epochs``).
    select_on_val
        Clients keep the epoch with the best private val AUC.
    student_init
        Where each distillation's student starts: ``previous`` (the current global model;
        the MIM base in round 1) or ``merged`` (the weight average of the round's teacher
        encoders, weighted by their training examples, with the current global heads);
        retention always pulls towards the previous global model. ``merged`` needs the
        teachers' weights in the global encoder's family: refused with
        ``privacy.transfer: predictions`` and with ``model.domain_arch``.
    relevance
        Per-sample relevance weighting (FedAUX-style): every client also returns one score
        per public pool image (``score_pool`` in its fit config; a discriminator of its own
        train images against the pool on its fine-tuned encoder's features), and a domain's
        head learns mostly from the pool images its teachers score as their own (each
        teacher's ``sample_weights``; see :mod:`strategies.distill`). Off: as before.
    """

    stages: tuple[tuple[str, ...], ...] = ()
    num_stages: int = 2
    rounds_per_stage: int = 1
    local_epochs: int | None = None
    select_on_val: bool = True
    student_init: Literal["previous", "merged"] = "previous"
    relevance: bool = False

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.rounds_per_stage < 1:
            raise ValueError("strategy.num_stages and strategy.rounds_per_stage must be >= 1")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise ValueError("strategy.local_epochs must be >= 1 (or null)")
        if self.student_init not in ("previous", "merged"):
            raise ValueError(f"strategy.student_init must be 'previous' or 'merged', got "
                             f"{self.student_init!r}")
        if any(not stage for stage in self.stages):
            raise ValueError("strategy.stages: every stage needs at least one domain")
        if not isinstance(self.relevance, bool):
            raise ValueError(f"strategy.relevance must be true or false, got "
                             f"{self.relevance!r}")


class Universal(Strategy):
    """Fine-tune locally, distil centrally: the mission's universal model.

    Options are :class:`UniversalOptions`; the distillation objective comes from the
    context (``distill.*``) and the seed of the distillation's sampling from the run seed.
    """

    name: ClassVar[str] = "universal"
    Options: ClassVar[type] = UniversalOptions
    distils: ClassVar[bool] = True
    predicts: ClassVar[bool] = True
    heterogeneous: ClassVar[bool] = True

    def __init__(self, options: UniversalOptions | None = None,
                 context: StrategyContext | None = None) -> None:
        super().__init__(options, context)
        opts: UniversalOptions = self.options
        self.stage_spec = [list(s) for s in opts.stages]
        self.num_stages = opts.num_stages
        self.rounds_per_stage = opts.rounds_per_stage
        self.local_epochs = opts.local_epochs
        self.select_on_val = opts.select_on_val
        self.settings = self.context.distill
        self.seed = self.context.seed
        self.stages: list[list[str]] = []
        self.global_heads: State = {}
        self.curves: dict[int, list[dict[str, Any]]] = {}

    @classmethod
    def planned_rounds(cls, options: Any, domains: Sequence[str], rounds: int) -> int:
        return len(plan_stages(domains, options.stages, options.num_stages)) \
            * options.rounds_per_stage

    @classmethod
    def check_transfer(cls, options: Any, transfer: str, *, heterogeneous: bool = False
                       ) -> None:
        super().check_transfer(options, transfer, heterogeneous=heterogeneous)
        if options.student_init == "merged" and transfer == "predictions":
            raise ValueError("strategy.student_init=merged averages the teachers' weights, "
                             "which privacy.transfer=predictions keeps at the clients; use "
                             "'previous'")
        if options.student_init == "merged" and heterogeneous:
            raise ValueError("strategy.student_init=merged averages the teachers' encoders, "
                             "which model.domain_arch makes of several families; use "
                             "'previous'")
        if heterogeneous and options.rounds_per_stage > 1:
            raise ValueError("strategy.rounds_per_stage > 1 with model.domain_arch: a client "
                             "of its own encoder family keeps no model between rounds (it "
                             "trains a fresh one each round); use rounds_per_stage=1")

    @classmethod
    def client_epochs(cls, options: Any, domains: Sequence[str], rounds: int,
                      local_epochs: int) -> int:
        # a client trains only in the rounds of its own stage
        return options.rounds_per_stage * cls.epochs_per_round(options, local_epochs)

    def initialize(self, clients: Sequence[ClientInfo], encoder: State) -> None:
        super().initialize(clients, encoder)
        domains = list(dict.fromkeys(d for c in clients for d in c.domains))
        self.stages = plan_stages(domains, self.stage_spec, self.num_stages)
        self.global_heads = {}
        self.curves = {}

    def stage_of(self, server_round: int) -> int:
        """Index of the stage that round ``server_round`` (1-based) belongs to."""
        return (server_round - 1) // self.rounds_per_stage

    def client_state(self, cid: str) -> State:
        return {**self.encoder, **heads_of(self.global_heads, self.clients[cid].domains)}

    def fit_candidates(self, server_round: int, cids: Sequence[str]) -> list[str]:
        # the clients of this round's stage
        stage = set(self.stages[self.stage_of(server_round)])
        return [c for c in cids if set(self.clients[c].domains) <= stage]

    def configure_fit(self, server_round: int, cids: Sequence[str]) -> dict[str, FitIns]:
        out = super().configure_fit(server_round, self.fit_candidates(server_round, cids))
        predictions = self.context.transfer == "predictions"
        for cid, ins in out.items():
            ins.config = {"select_on_val": self.select_on_val,
                          **({"epochs": self.local_epochs} if self.local_epochs else {}),
                          **({"score_pool": True} if self.options.relevance else {}),
                          **({"pool_outputs": True} if predictions else {})}
            arch = self.clients[cid].arch
            if arch is not None:  # its own family: a fresh model, nothing of the global one
                ins.state, ins.fresh_heads = {}, tuple(self.clients[cid].domains)
                ins.config["arch"] = arch
        return out

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        if self.distiller is None:
            raise RuntimeError("the universal strategy needs a distiller (the engine binds one)")
        if not results:
            raise ValueError(f"round {server_round}: no teacher to distil")
        teachers = teachers_from(results, self.clients, relevance=self.options.relevance)
        onboarded = {d for stage in self.stages[:self.stage_of(server_round) + 1]
                     for d in stage}
        heads = {}
        for info in self.clients.values():
            for d in info.domains:
                if d in onboarded:
                    heads[d] = (info.tasks[d], info.num_classes[d])
        previous = {**self.encoder, **self.global_heads}
        student = dict(previous)
        if self.options.student_init == "merged":
            student.update(merged_encoder(teachers))
        request = DistillRequest(student=student, teachers=teachers,
                                 previous=previous if self.global_heads else {}, heads=heads,
                                 settings=self.settings, seed=self.seed * 1000 + server_round,
                                 tag=f"distill-round-{server_round:04d}",
                                 server_round=server_round)
        result = self.distiller.distil(request)
        self.encoder = encoder_of(result.state)
        self.global_heads = heads_of(result.state)
        self.curves[server_round] = result.curve
        return {**result.metrics, "teachers": float(len(teachers)),
                "clients_failed": float(len(failures))}

    def global_state(self) -> State:
        """The universal model: shared encoder and every domain's head."""
        return {**self.encoder, **self.global_heads}

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "heads": {}, "global_heads": self.global_heads,
                "curves": self.curves, "settings": asdict(self.settings)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.global_heads = dict(state["global_heads"])
        self.curves = {int(k): v for k, v in state["curves"].items()}
