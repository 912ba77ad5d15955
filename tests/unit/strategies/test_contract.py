"""Every registered strategy honours the contract the engine relies on (one test per
strategy, parametrised over the registry, so a new strategy is checked by being added)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from strategies import POOLED_CID, STRATEGIES, FitRes, StrategyContext, create_strategy
from strategies.distill import DistillRequest, DistillResult, DistillSettings
from strategies.state import encoder_of, head_of, head_prefix
from strategies.types import ClientInfo

DOMAINS = ("a", "b", "c", "d")


class FakeDistiller:
    """A DistillService that returns the mean of its teachers (no training)."""

    def distil(self, request: DistillRequest) -> DistillResult:
        state = {k: torch.stack([t.state[k] for t in request.teachers]).mean(0)
                 for k in encoder_of(request.teachers[0].state)}
        for domain, (_, n) in request.heads.items():
            state[f"{head_prefix(domain)}weight"] = torch.zeros(n, 2)
        return DistillResult(state=state, metrics={"distill_agreement": 1.0},
                             curve=[{"step": 1.0}])


def _clients(pooled: bool) -> list[ClientInfo]:
    out = [ClientInfo(cid=d, domains=(d,), tasks={d: "binary"}, num_classes={d: 2},
                      num_train=10 * (i + 1)) for i, d in enumerate(DOMAINS)]
    if pooled:
        out.insert(0, ClientInfo(cid=POOLED_CID, domains=DOMAINS,
                                 tasks=dict.fromkeys(DOMAINS, "binary"),
                                 num_classes=dict.fromkeys(DOMAINS, 2), num_train=100))
    return out


def _fit_result(cid: str, info: ClientInfo, state: dict, value: float) -> FitRes:
    out = {k: torch.full_like(v, value) for k, v in encoder_of(state).items()}
    for domain in info.domains:
        out[f"{head_prefix(domain)}weight"] = torch.full((2, 2), value)
    return FitRes(cid=cid, state=out, num_examples=info.num_train)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_contract(name: str) -> None:
    cls = STRATEGIES[name]
    assert cls.name == name and cls.__doc__, "registered under its own name, documented"
    assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen
    options = cls.Options()  # every option has a default
    facts = cls.describe()  # what `umim strategies` prints, as plain data
    assert json.loads(json.dumps(facts)) == facts
    assert facts["name"] == name
    assert facts["declares"] == {"pooled": cls.pooled, "distils": cls.distils,
                                 "predicts": cls.predicts, "heterogeneous": cls.heterogeneous}
    assert list(facts["options"]) == [f.name for f in dataclasses.fields(cls.Options)]
    rounds = cls.planned_rounds(options, DOMAINS, 3)
    assert isinstance(rounds, int) and rounds >= 1

    strategy = create_strategy(name, None, StrategyContext(seed=1, distill=DistillSettings()))
    clients = _clients(cls.pooled)
    strategy.initialize(clients, {"encoder.w": torch.zeros(3)})
    if cls.distils:
        strategy.distiller = FakeDistiller()
    assert strategy.num_rounds(3) == rounds
    infos = {c.cid: c for c in clients}
    fit_cids = [POOLED_CID] if cls.pooled else list(DOMAINS)
    for server_round in range(1, rounds + 1):
        instructions = strategy.configure_fit(server_round, fit_cids)
        assert instructions and set(instructions) <= set(fit_cids)
        for cid, ins in instructions.items():
            assert encoder_of(ins.state), f"{cid} gets the global encoder"
            assert all(head_of(ins.state, d) or d in ins.fresh_heads
                       for d in infos[cid].domains), "a head, or a fresh one, per domain"
        results = {cid: _fit_result(cid, infos[cid], ins.state, float(server_round))
                   for cid, ins in instructions.items()}
        metrics = strategy.aggregate_fit(server_round, results, {})
        assert all(isinstance(v, float) and not math.isnan(v) for v in metrics.values())
    evaluate = strategy.configure_evaluate(rounds, list(DOMAINS), "test")
    assert set(evaluate) == set(DOMAINS)  # every real client scores the final model
    for cid, ins in evaluate.items():
        assert ins.split == "test" and head_of(ins.state, cid) and encoder_of(ins.state)

    again = create_strategy(name, options, StrategyContext(seed=1))
    again.initialize(clients, {"encoder.w": torch.zeros(3)})
    again.load_state_dict(strategy.state_dict())  # a checkpoint restores the server state
    for cid in DOMAINS:
        mine, theirs = strategy.client_state(cid), again.client_state(cid)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_unknown_options_are_refused_naming_the_strategy() -> None:
    with pytest.raises(ValueError, match="fedavg"):
        create_strategy("fedavg", {"proximal_mu": 0.1})
