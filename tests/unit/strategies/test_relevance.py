"""Per-sample relevance weighting (FedAUX-style): the objective's rule, the teachers' sample
weights, and the universal strategy's ``strategy.relevance`` option (no engine here)."""

from __future__ import annotations

import pytest
import torch

from strategies import FitRes, StrategyContext, create_strategy
from strategies.distill import (
    DistillRequest,
    DistillResult,
    DistillService,
    DistillSettings,
    Teacher,
    distillation_loss,
    domain_relevance,
    normalised_sample_weights,
    teacher_weights,
    tempered_probs,
)
from strategies.types import ClientInfo
from strategies.universal import UniversalOptions, teachers_from

B, K, F = 6, 3, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(seed: int = 0) -> dict[str, object]:
    """A batch of two taught domains (multi-class and binary) and one retained domain."""
    g = torch.Generator().manual_seed(seed)
    logits = {"a": torch.randn(B, K, generator=g), "b": torch.randn(B, 2, generator=g),
              "c": torch.randn(B, 4, generator=g)}
    projected = {d: torch.randn(B, F, generator=g) for d in ("a", "b")}
    teacher_probs = {"a": tempered_probs(torch.randn(B, K, generator=g), 4.0, "multi-class"),
                     "b": tempered_probs(torch.randn(B, 2, generator=g), 4.0, "binary")}
    teacher_features = {d: torch.randn(B, F, generator=g) for d in ("a", "b")}
    previous = {"c": tempered_probs(torch.randn(B, 4, generator=g), 4.0, "multi-label")}
    conf = torch.rand(2, B, generator=g)
    return {"logits": logits, "projected": projected, "teacher_probs": teacher_probs,
            "teacher_features": teacher_features, "previous_probs": previous,
            "weights": teacher_weights(conf, "confidence"),
            "tasks": {"a": "multi-class", "b": "binary", "c": "multi-label"},
            "settings": DistillSettings(beta=0.5, gamma=1.0)}


def _loss(batch: dict[str, object], **extra: object) -> dict[str, torch.Tensor]:
    b = dict(batch)
    return distillation_loss(b.pop("logits"), b.pop("projected"), **b, **extra)


# -- the objective --------------------------------------------------------------------------
def test_sample_weights_of_one_give_the_unweighted_objective_exactly() -> None:
    batch = _batch()
    plain = _loss(batch)
    ones = _loss(batch, sample_weights={"a": torch.ones(B), "b": torch.ones(B)})
    partial = _loss(batch, sample_weights={"a": torch.ones(B)})
    for name, value in plain.items():
        assert torch.equal(value, ones[name]), name
        assert torch.equal(value, partial[name]), name
    assert torch.equal(plain["loss"], _loss(batch, sample_weights={})["loss"])


def test_zero_weights_remove_the_images_kd_and_feature_contribution() -> None:
    batch = _batch(1)
    keep = [0, 1, 2]
    rho = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, 0.0])  # mean 1 over the batch
    weighted = _loss(batch, sample_weights={"a": rho, "b": rho})
    sub = {name: ({d: v[keep] for d, v in value.items()} if isinstance(value, dict)
                  and name not in ("tasks",) else value) for name, value in batch.items()}
    sub["weights"] = batch["weights"][:, keep]
    subset = _loss(sub)
    for name in ("kd", "feature"):
        torch.testing.assert_close(weighted[name], subset[name], rtol=1e-6, atol=1e-7)
    # and the student gets no KD / feature gradient from the zero-weight images
    logits = {d: v.clone().requires_grad_(True) for d, v in batch["logits"].items()}
    projected = {d: v.clone().requires_grad_(True) for d, v in batch["projected"].items()}
    rest = {k: v for k, v in batch.items() if k not in ("logits", "projected")}
    rest["previous_probs"] = {}
    terms = distillation_loss(logits, projected, **rest, sample_weights={"a": rho, "b": rho})
    terms["loss"].backward()
    for d in ("a", "b"):
        assert torch.all(logits[d].grad[3:] == 0) and torch.any(logits[d].grad[:3] != 0)
        assert torch.all(projected[d].grad[3:] == 0)


def test_relevance_scales_only_its_domain() -> None:
    batch = _batch(2)
    plain = _loss(batch)
    heavier = _loss(batch, sample_weights={"a": torch.full((B,), 2.0)})
    assert float(heavier["kd"]) > float(plain["kd"])
    assert torch.equal(heavier["retention"], plain["retention"])


def test_domain_relevance_mixes_the_teachers_of_a_domain_per_image() -> None:
    w = torch.tensor([0.25, 0.75])
    r = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    mix, rho = domain_relevance(w, r)
    torch.testing.assert_close(rho, torch.tensor([0.5, 0.75, 0.0, 1.0]))
    torch.testing.assert_close(mix[:, 0], torch.tensor([1.0, 0.0]))  # only teacher 0 counts
    torch.testing.assert_close(mix[:, 1], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(mix[:, 2], w)  # nobody's: the example weights (rho is 0)
    torch.testing.assert_close(mix[:, 3], w)  # equal relevance: as without it
    torch.testing.assert_close(mix.sum(0), torch.ones(4))


def test_sample_weights_are_normalised_to_mean_one() -> None:
    r = normalised_sample_weights(torch.tensor([0.1, 0.3, 0.0, 0.4]))
    torch.testing.assert_close(r.mean(), torch.tensor(1.0))
    torch.testing.assert_close(r, torch.tensor([0.5, 1.5, 0.0, 2.0]))


@pytest.mark.parametrize("weights, match", [
    (torch.ones(2, 3), "1-D float"), (torch.ones(4, dtype=torch.long), "1-D float"),
    ([1.0, 2.0], "1-D float"), (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([1.0, -0.1]), ">= 0"), (torch.zeros(3), "all zero")])
def test_bad_sample_weights_name_the_teacher(weights: object, match: str) -> None:
    with pytest.raises(ValueError, match=rf"teacher c1/a: sample_weights.*{match}"):
        Teacher(cid="c1", domain="a", task="binary", num_classes=2, state={},
                sample_weights=weights)  # type: ignore[arg-type]


# -- the universal strategy -----------------------------------------------------------------
class Recorder(DistillService):
    def __init__(self) -> None:
        self.requests: list[DistillRequest] = []

    def distil(self, request: DistillRequest) -> DistillResult:
        self.requests.append(request)
        state = {"encoder.w": torch.zeros(2)}
        for d, (_, n) in request.heads.items():
            state[f"heads.{d}.weight"] = torch.zeros(n, 2)
        return DistillResult(state=state, metrics={}, curve=[])


DOMAINS = ["a", "b", "c", "d"]


def _strategy(**options: object):
    s = create_strategy("universal", {"num_stages": 2, **options},
                        StrategyContext(seed=0, distill=DistillSettings()))
    infos = [ClientInfo(cid=d, domains=(d,), tasks={d: "binary"}, num_classes={d: 2},
                        num_train=10) for d in DOMAINS]
    s.initialize(infos, {"encoder.w": torch.zeros(2)})
    s.distiller = Recorder()
    return s


def _result(cid: str, scores: torch.Tensor | None) -> FitRes:
    return FitRes(cid, {"encoder.w": torch.ones(2), f"heads.{cid}.weight": torch.ones(2, 2)},
                  num_examples=10, pool_scores=scores)


def test_relevance_asks_for_pool_scores_and_hands_them_to_the_teachers() -> None:
    s = _strategy(relevance=True)
    ins = s.configure_fit(1, DOMAINS)
    assert sorted(ins) == ["a", "b"]
    assert all(i.config["score_pool"] is True for i in ins.values())
    scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.2, 0.8, 0.4])}
    s.aggregate_fit(1, {c: _result(c, v) for c, v in scores.items()}, {})
    teachers = s.distiller.requests[0].teachers
    assert [t.cid for t in teachers] == ["a", "b"]
    for t in teachers:
        assert torch.equal(t.sample_weights, scores[t.cid])
    with pytest.raises(ValueError, match="client c returned no pool scores"):
        s.aggregate_fit(2, {"c": _result("c", None)}, {})


def test_without_relevance_nothing_changes() -> None:
    s = _strategy()
    ins = s.configure_fit(1, DOMAINS)
    assert all("score_pool" not in i.config for i in ins.values())
    s.aggregate_fit(1, {c: _result(c, torch.ones(3)) for c in ("a", "b")}, {})
    assert all(t.sample_weights is None for t in s.distiller.requests[0].teachers)
    infos = {c: s.clients[c] for c in ("a", "b")}
    assert teachers_from({"a": _result("a", None)}, infos)[0].sample_weights is None


def test_relevance_option_is_validated() -> None:
    assert UniversalOptions().relevance is False
    assert UniversalOptions(relevance=True).relevance is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"strategy\.relevance"):
            UniversalOptions(relevance=bad)  # type: ignore[arg-type]
