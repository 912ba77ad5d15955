"""The universal strategy: clients fine-tune, the server distils them into one global model.

Per round of stage ``s`` (domains join in stages):

1. **Onboard**: every client of stage ``s`` receives the current global encoder and its
   domain's global head (a fresh head the first time).
2. **Local training**: it fine-tunes encoder and head on its private train split, keeping
   the epoch with the best private val AUC.
3. **Transfer**: it returns the fine-tuned weights (the teacher); nothing else.
4. **Distil**: the server's distiller (Ray Train, provided by the engine) trains the global
   student, one shared encoder and one head per domain, on the unlabelled pool against the
   teachers, with feature matching and retention of the previous global model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar

from strategies.aggregate import select
from strategies.base import ENCODER, HEADS, Strategy, heads_of
from strategies.distill import DistillRequest, DistillService, DistillSettings, Teacher
from strategies.types import ClientInfo, FitIns, FitRes, State


def teachers_from(results: Mapping[str, FitRes], infos: Mapping[str, ClientInfo]
                  ) -> list[Teacher]:
    """One teacher per client and domain: the client's encoder and that domain's head,
    weighted by the client's number of training examples."""
    teachers = []
    for cid in sorted(results):
        info, state = infos[cid], results[cid].state
        for domain in info.domains:
            teachers.append(Teacher(cid=cid, domain=domain, task=info.tasks[domain],
                                    num_classes=info.num_classes[domain],
                                    state={**select(state, ENCODER),
                                           **select(state, f"{HEADS}{domain}.")},
                                    weight=float(results[cid].num_examples)))
    return teachers


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


class Universal(Strategy):
    """Fine-tune locally, distil centrally: the mission's universal model.

    Parameters
    ----------
    stages, num_stages, rounds_per_stage
        Stage plan (see :func:`plan_stages`) and rounds of each stage.
    local_epochs
        Local fine-tuning epochs per round (``None``: the clients' default).
    select_on_val
        Clients keep their best epoch by private val AUC.
    distill
        Distillation knobs.
    seed
        Seed of the distillation's sampling.
    """

    name: ClassVar[str] = "universal"
    options: ClassVar[tuple[str, ...]] = ("stages", "num_stages", "rounds_per_stage",
                                          "local_epochs", "select_on_val", "distill", "seed")

    def __init__(self, stages: Sequence[Sequence[str]], num_stages: int, rounds_per_stage: int,
                 local_epochs: int | None, select_on_val: bool,
                 distill: DistillSettings | Mapping[str, Any], seed: int) -> None:
        super().__init__()
        self.stage_spec = [list(s) for s in stages]
        self.num_stages = num_stages
        self.rounds_per_stage = rounds_per_stage
        self.local_epochs = local_epochs
        self.select_on_val = select_on_val
        self.settings = distill if isinstance(distill, DistillSettings) else \
            DistillSettings(**distill)
        self.seed = seed
        self.distiller: DistillService | None = None
        self.stages: list[list[str]] = []
        self.global_heads: State = {}
        self.curves: dict[int, list[dict[str, Any]]] = {}

    def initialize(self, clients: Sequence[ClientInfo], encoder: State) -> None:
        super().initialize(clients, encoder)
        domains = list(dict.fromkeys(d for c in clients for d in c.domains))
        self.stages = plan_stages(domains, self.stage_spec, self.num_stages)
        self.global_heads = {}
        self.curves = {}

    def num_rounds(self, configured: int) -> int:
        return len(self.stages) * self.rounds_per_stage

    def stage_of(self, server_round: int) -> int:
        """Index of the stage that round ``server_round`` (1-based) belongs to."""
        return (server_round - 1) // self.rounds_per_stage

    def client_state(self, cid: str) -> State:
        return {**self.encoder, **heads_of(self.global_heads, self.clients[cid].domains)}

    def configure_fit(self, server_round: int, cids: Sequence[str]) -> dict[str, FitIns]:
        stage = set(self.stages[self.stage_of(server_round)])
        active = [c for c in cids if set(self.clients[c].domains) <= stage]
        out = super().configure_fit(server_round, active)
        for ins in out.values():
            ins.config = {"select_on_val": self.select_on_val,
                          **({"epochs": self.local_epochs} if self.local_epochs else {})}
        return out

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        if self.distiller is None:
            raise RuntimeError("the universal strategy needs a distiller (the engine binds one)")
        if not results:
            raise ValueError(f"round {server_round}: no teacher to distil")
        teachers = teachers_from(results, self.clients)
        onboarded = {d for stage in self.stages[:self.stage_of(server_round) + 1]
                     for d in stage}
        heads = {}
        for info in self.clients.values():
            for d in info.domains:
                if d in onboarded:
                    heads[d] = (info.tasks[d], info.num_classes[d])
        previous = {**self.encoder, **self.global_heads}
        request = DistillRequest(student=dict(previous), teachers=teachers,
                                 previous=previous if self.global_heads else {}, heads=heads,
                                 settings=self.settings, seed=self.seed * 1000 + server_round,
                                 tag=f"distill-round-{server_round:04d}",
                                 server_round=server_round)
        result = self.distiller.distil(request)
        self.encoder = select(result.state, ENCODER)
        self.global_heads = select(result.state, HEADS)
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
