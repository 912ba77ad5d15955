"""Per-sample relevance in the distillation job (no Ray): the teachers' sample weights follow
their pool images on the precomputed path, through a random view and through mixup (the
lambda-mix of the two images' weights), mix a domain's teachers per image, and leave the
default path untouched."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from synthetic_requests import synthetic_request

import engine.train.distill as distill
from engine.config import ModelConfig
from engine.nn.models import build_model
from engine.train.distill import DistillError, DistillJob
from strategies.distill import DistillRequest, tempered_probs
from strategies.types import State

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
CPU = torch.device("cpu")
N = 80


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pool() -> torch.Tensor:
    return torch.randn(N, 3, 28, 28, generator=torch.Generator().manual_seed(5))


def _relevance_of(x: torch.Tensor) -> torch.Tensor:
    """A weight that is an affine function of each image (so a mixed image's weight is the
    mix of its two images' weights), positive on these images."""
    return x.mean(dim=(1, 2, 3)) + 1.0


def _net_state(domain: str, k: int, seed: int) -> State:
    torch.manual_seed(seed)
    return dict(build_model(TINY, {domain: k}).state_dict())


def _request(weights: dict[str, torch.Tensor | None] | None = None, **changes: Any
             ) -> DistillRequest:
    """Two teachers of domain ``a`` (c0, c1) and one of ``b`` (c2), a retained head ``c``."""
    return synthetic_request(steps=6, eval_every=3, sample_weights=weights, **changes)


def _final(request: DistillRequest) -> State:
    job = DistillJob(request, TINY, _pool(), CPU)
    job.run()
    return job.student_state()


def _same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_sample_weights_nothing_of_relevance_runs() -> None:
    job = DistillJob(_request(), TINY, _pool(), CPU)
    assert job.train_t is not None and job.train_t["relevance"] == {}
    per_batch = DistillJob(_request(augment=True), TINY, _pool(), CPU)
    assert per_batch.train_rel is None and per_batch.hold_t["relevance"] == {}
    assert _same(_final(_request()), _final(_request({"c0": None, "c1": None, "c2": None})))


@pytest.mark.parametrize("changes", [{}, {"augment": True, "mixup_alpha": 0.4}])
def test_weights_of_one_give_the_default_student(changes: dict[str, Any]) -> None:
    ones = {c: torch.ones(N) for c in ("c0", "c1", "c2")}
    plain, weighted = _final(_request(**changes)), _final(_request(ones, **changes))
    for key, value in plain.items():
        torch.testing.assert_close(weighted[key], value, rtol=1e-4, atol=1e-5)


def test_weights_follow_their_images_on_the_precomputed_path() -> None:
    pool = _pool()
    r = _relevance_of(pool)
    job = DistillJob(_request({"c2": r}), TINY, pool, CPU)
    assert set(job.train_t["relevance"]) == {"b"}  # a has no weights: as before
    expected = _relevance_of(job.x_train) / r.mean()
    torch.testing.assert_close(job.train_t["relevance"]["b"], expected)
    torch.testing.assert_close(job.hold_t["relevance"]["b"], _relevance_of(job.x_hold) / r.mean())


def test_zero_weights_hand_each_image_to_the_other_teacher_of_its_domain() -> None:
    pool = _pool()
    score = _relevance_of(pool)
    first = (score > score.median()).float()
    job = DistillJob(_request({"c0": first, "c1": 1.0 - first}), TINY, pool, CPU)
    probs = {}
    for i in (0, 1):
        net = build_model(TINY, {"a": 3})
        net.load_state_dict(_net_state("a", 3, i + 1))
        with torch.no_grad():
            probs[i] = tempered_probs(net.eval()(job.x_train, "a"), 4.0, "multi-class")
    mine = (_relevance_of(job.x_train) > score.median())
    got = job.train_t["probs"]["a"]
    torch.testing.assert_close(got[mine], probs[0][mine], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[~mine], probs[1][~mine], rtol=1e-5, atol=1e-6)
    # rho = w_i * r_i: each image weighs its one relevant teacher's share of the domain
    rho = job.train_t["relevance"]["a"]
    w0, w1 = 1 / 3, 2 / 3
    torch.testing.assert_close(rho[mine], torch.full_like(rho[mine], w0 / first.mean()))
    torch.testing.assert_close(rho[~mine], torch.full_like(rho[~mine], w1 / (1 - first).mean()))


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, Any]]:
    seen: list[tuple[torch.Tensor, Any]] = []
    outputs = distill.frozen_outputs

    def spy(models: Any, x: torch.Tensor, device: torch.device, chunk: int = 1024,
            relevance: Any = None) -> Any:
        seen.append((x.clone(), relevance))
        return outputs(models, x, device, chunk, relevance)

    monkeypatch.setattr(distill, "frozen_outputs", spy)
    return seen


def test_a_random_view_keeps_its_images_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _pool()
    r = _relevance_of(pool)
    job = DistillJob(_request({"c2": r}, augment=True), TINY, pool, CPU)
    seen = _spy(monkeypatch)
    replay = torch.Generator().manual_seed(job.generator.initial_seed())
    idx = torch.randint(len(job.x_train), (16,), generator=replay)
    job.step()
    (_, relevance), = seen
    torch.testing.assert_close(relevance["b"][0], _relevance_of(job.x_train[idx]) / r.mean())


def test_a_mixed_image_weighs_the_lambda_mix_of_its_two_images(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = _pool()
    r = _relevance_of(pool)
    job = DistillJob(_request({"c0": r, "c2": r}, mixup_alpha=0.4), TINY, pool, CPU)
    seen = _spy(monkeypatch)
    replay = torch.Generator().manual_seed(job.generator.initial_seed())
    idx = torch.randint(len(job.x_train), (16,), generator=replay)
    job.step()
    (x, relevance), = seen
    assert not torch.allclose(x, job.x_train[idx])  # mixed
    # the weight is affine in the image, so the mixed image's own weight is the lambda-mix
    expected = _relevance_of(x) / r.mean()
    torch.testing.assert_close(relevance["b"][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(relevance["a"][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(relevance["a"][1], torch.ones(16))  # c1 has none: 1


def test_sample_weights_of_another_length_are_an_error() -> None:
    with pytest.raises(DistillError, match=r"teacher c2/b: 79 sample weights for a pool of 80"):
        DistillJob(_request({"c2": torch.ones(N - 1)}), TINY, _pool(), CPU)


def test_relevance_changes_the_student_and_is_seeded() -> None:
    r = _relevance_of(_pool()).clamp_min(0) ** 4
    base = _request({"c0": r, "c1": r, "c2": r})
    a, b = _final(base), _final(replace(base))
    assert _same(a, b)
    assert not _same(a, _final(_request()))
