from __future__ import annotations

import pytest
import torch

from strategies import FitRes, StrategyContext, create_strategy
from strategies.distill import DistillRequest, DistillResult, DistillService, DistillSettings
from strategies.types import ClientInfo
from strategies.universal import plan_stages

DOMAINS = ["a", "b", "c", "d"]


def test_plan_stages() -> None:
    assert plan_stages(DOMAINS, [], 2) == [["a", "b"], ["c", "d"]]
    assert plan_stages(DOMAINS, [], 3) == [["a"], ["b", "c"], ["d"]]
    assert plan_stages(DOMAINS, [["d"], ["a", "b", "c"]], 2) == [["d"], ["a", "b", "c"]]
    with pytest.raises(ValueError, match="exactly once"):
        plan_stages(DOMAINS, [["a"], ["b"]], 2)
    with pytest.raises(ValueError, match="exceeds"):
        plan_stages(DOMAINS, [], 5)


class RecordingDistiller(DistillService):
    """A stand-in for the Ray Train distiller: records requests, returns a known student."""

    def __init__(self) -> None:
        self.requests: list[DistillRequest] = []

    def distil(self, request: DistillRequest) -> DistillResult:
        self.requests.append(request)
        state = {"encoder.w": torch.full((2,), float(len(self.requests)))}
        for d, (_, n) in request.heads.items():
            state[f"heads.{d}.weight"] = torch.full((n, 2), float(len(self.requests)))
        return DistillResult(state=state, metrics={"distill_agreement": 0.9},
                             curve=[{"step": 1.0, "agreement": 0.9}])


def _strategy(rounds_per_stage: int = 1):
    s = create_strategy("universal", {"stages": (), "num_stages": 2,
                                      "rounds_per_stage": rounds_per_stage, "local_epochs": 3,
                                      "select_on_val": True},
                        StrategyContext(seed=0, distill=DistillSettings()))
    clients = [ClientInfo(cid=d, domains=(d,), tasks={d: "binary"}, num_classes={d: 2},
                          num_train=10 * (i + 1)) for i, d in enumerate(DOMAINS)]
    s.initialize(clients, {"encoder.w": torch.zeros(2)})
    s.distiller = RecordingDistiller()
    return s


def _teacher(cid: str, value: float) -> FitRes:
    return FitRes(cid, {"encoder.w": torch.full((2,), value),
                        f"heads.{cid}.weight": torch.full((2, 2), value)}, num_examples=10)


def test_stage_one_onboards_its_clients_with_fresh_heads() -> None:
    s = _strategy()
    assert s.num_rounds(99) == 2
    ins = s.configure_fit(1, DOMAINS)
    assert sorted(ins) == ["a", "b"]
    assert ins["a"].fresh_heads == ("a",) and ins["a"].config == {"select_on_val": True,
                                                                   "epochs": 3}
    assert set(ins["a"].state) == {"encoder.w"}
    assert s.configure_evaluate(1, DOMAINS, "val") == {}  # nobody has a global head yet


def test_distillation_request_holds_weights_and_retention() -> None:
    s = _strategy()
    s.aggregate_fit(1, {"a": _teacher("a", 1.0), "b": _teacher("b", 2.0)}, {})
    first = s.distiller.requests[0]
    assert [t.domain for t in first.teachers] == ["a", "b"]
    assert first.previous == {}  # nothing to retain in stage one
    assert set(first.heads) == {"a", "b"}
    assert all(set(t.state) == {"encoder.w", f"heads.{t.domain}.weight"}
               for t in first.teachers)
    # stage two: c and d join with the global encoder; a and b are retained
    ins = s.configure_fit(2, DOMAINS)
    assert sorted(ins) == ["c", "d"]
    torch.testing.assert_close(ins["c"].state["encoder.w"], torch.full((2,), 1.0))
    s.aggregate_fit(2, {"c": _teacher("c", 3.0), "d": _teacher("d", 4.0)}, {"x": "died"})
    second = s.distiller.requests[1]
    assert set(second.heads) == set(DOMAINS)
    assert {"heads.a.weight", "heads.b.weight"} <= set(second.previous)
    assert set(s.configure_evaluate(2, DOMAINS, "test")) == set(DOMAINS)
    assert set(s.client_state("c")) == {"encoder.w", "heads.c.weight"}


def test_repeated_rounds_send_the_global_head_and_restore() -> None:
    s = _strategy(rounds_per_stage=2)
    assert s.num_rounds(1) == 4
    s.aggregate_fit(1, {"a": _teacher("a", 1.0), "b": _teacher("b", 1.0)}, {})
    ins = s.configure_fit(2, DOMAINS)
    assert sorted(ins) == ["a", "b"] and ins["a"].fresh_heads == ()
    other = _strategy(rounds_per_stage=2)
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.global_state()["heads.a.weight"], s.global_state()["heads.a.weight"])
    assert other.curves == s.curves


def test_without_a_distiller_the_strategy_refuses() -> None:
    s = _strategy()
    s.distiller = None
    with pytest.raises(RuntimeError, match="needs a distiller"):
        s.aggregate_fit(1, {"a": _teacher("a", 1.0)}, {})


def test_a_merged_student_starts_from_the_teachers_weight_average() -> None:
    s = create_strategy("universal", {"num_stages": 2, "student_init": "merged"},
                        StrategyContext(seed=0, distill=DistillSettings()))
    clients = [ClientInfo(cid=d, domains=(d,), tasks={d: "binary"}, num_classes={d: 2},
                          num_train=10) for d in DOMAINS]
    s.initialize(clients, {"encoder.w": torch.zeros(2)})
    s.distiller = RecordingDistiller()
    a, b = _teacher("a", 1.0), _teacher("b", 4.0)
    b.num_examples = 30  # weights 10 and 30: (1 * 10 + 4 * 30) / 40 = 3.25
    s.aggregate_fit(1, {"a": a, "b": b}, {})
    request = s.distiller.requests[0]
    torch.testing.assert_close(request.student["encoder.w"], torch.full((2,), 3.25))
    assert request.previous == {}
    default = _strategy()
    default.aggregate_fit(1, {"a": a, "b": b}, {})
    torch.testing.assert_close(default.distiller.requests[0].student["encoder.w"],
                               torch.zeros(2))  # previous: the initial encoder
