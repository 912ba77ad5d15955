"""Distillation that can fail: the student learns from real teachers, retention keeps a
stage-1 domain's head, and the function-matching levers (``distill.augment``,
``distill.mixup_alpha``) feed one view to teachers and student and still learn. No Ray.

Teachers are made as the engine makes them: a :class:`~engine.fl.client.Client` fine-tunes a
tiny ViT on its real shard and :func:`strategies.universal.teachers_from` turns the result
into teachers. The unlabelled pool is the test images of the two domains (no labels read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic_requests import synthetic_request

import engine.train.distill as distill
from engine.config import ModelConfig, TrainConfig, load_config
from engine.data import ShardBuilder, domain_catalog
from engine.data.shards import read_shard
from engine.fl.client import Client, ClientSpec
from engine.nn.models import build_model
from engine.train.distill import DistillJob, mixup, random_view
from strategies.distill import DistillRequest, DistillSettings, Teacher, agreement
from strategies.state import encoder_of, heads_of, is_head_key
from strategies.types import ClientInfo, EvaluateIns, FitIns, FitRes, State
from strategies.universal import teachers_from

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
A, B = "pathology", "retina"  # stage 1 and stage 2 (9 and 5 classes)
STEPS = dict(steps=100, batch_size=32, eval_every=25, patience=10, lr=1e-3)
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    """Two real domains' clients, their fine-tuned results, the pool and the start encoder."""

    clients: dict[str, Client]
    results: dict[str, FitRes]
    infos: dict[str, ClientInfo]
    pool: torch.Tensor
    val: dict[str, torch.Tensor]
    init: State

    def teachers(self, domain: str) -> list[Teacher]:
        return teachers_from({domain: self.results[domain]}, {domain: self.infos[domain]})

    def heads(self, *domains: str) -> dict[str, tuple[Any, int]]:
        return {d: (self.infos[d].tasks[d], self.infos[d].num_classes[d]) for d in domains}


@pytest.fixture(scope="module")
def world(data_root: Path, shard_cache: Path) -> World:
    builder = ShardBuilder(domain_catalog(), data_root, shard_cache, download=False)
    torch.manual_seed(0)
    init = encoder_of(build_model(TINY, {}).state_dict())
    clients, results, images, val = {}, {}, [], {}
    for domain in (A, B):
        paths = {s: str(p) for s, p in builder.domain(domain).items()}
        client = Client(ClientSpec(domain, {domain: paths}), TINY,
                        TrainConfig(batch_size=32, lr=1e-3, local_epochs=3), seed=0,
                        max_train_samples=400, max_eval_samples=200, device="cpu")
        results[domain] = client.fit(FitIns(dict(init), (domain,), {"round": 1, "seed": 0}))
        clients[domain] = client
        x, _ = read_shard(Path(paths["test"])).tensors()  # images only: the pool is unlabelled
        images.append(x[:150])
        val[domain] = read_shard(Path(paths["val"])).tensors()[0]
    return World(clients, results, {d: c.info() for d, c in clients.items()},
                 torch.cat(images), val, init)


def _settings(**changes: Any) -> DistillSettings:
    return DistillSettings(**{**STEPS, **changes})


def _stage1(world: World, seed: int = 1, **changes: Any) -> DistillRequest:
    """Round 1 of the universal strategy: no global heads yet, domain A's teacher."""
    return DistillRequest(student=dict(world.init), teachers=world.teachers(A), previous={},
                          heads=world.heads(A), settings=_settings(**changes), seed=seed)


def _learns(job: DistillJob) -> tuple[float, float, list[dict[str, float]]]:
    """Held-out agreement of the untrained student, of the final one, and the curve."""
    before = job.evaluate()["agreement"]
    curve = job.run()
    return before, job.evaluate()["agreement"], curve


@pytest.fixture(scope="module")
def stage1(world: World) -> dict[str, Any]:
    job = DistillJob(_stage1(world), TINY, world.pool, CPU)
    before, after, curve = _learns(job)
    return {"state": job.student_state(), "before": before, "after": after, "curve": curve}


# -- the student learns --------------------------------------------------------------------
def test_the_student_learns_to_agree_with_its_teacher(stage1: dict[str, Any]) -> None:
    before, after = stage1["before"], stage1["after"]
    assert before < 0.5, f"the untrained student already agrees ({before:.2f})"
    assert after >= before + 0.35 and after >= 0.75, (before, after)
    assert stage1["curve"][-1]["best_agreement"] >= after


# -- retention -----------------------------------------------------------------------------
def _head_agreement(state: State, reference: State, domain: str, task: Any, k: int,
                    x: torch.Tensor) -> float:
    """How often ``state``'s head of ``domain`` predicts as ``reference``'s on ``x``."""
    out = []
    for s in (state, reference):
        net = build_model(TINY, {domain: k})
        net.load_state_dict({**encoder_of(s), **heads_of(s, [domain])})
        with torch.no_grad():
            out.append(net.eval()(x, domain))
    return float(agreement(out[0], out[1], task))


def test_retention_keeps_the_stage1_domain_head(world: World, stage1: dict[str, Any]) -> None:
    """Stage 2 distils only B's teacher from the stage-1 global model, as
    ``Universal.aggregate_fit`` does; retention (gamma) must keep A's head: its predictions
    on A's real val images stay the stage-1 model's, and so does its val AUC."""
    previous = stage1["state"]
    task, k = world.heads(A)[A]
    start = world.clients[A].evaluate(EvaluateIns(previous, "val")).metrics[A]["auc"]
    scores = {}
    for gamma in (0.0, 1.0):
        request = DistillRequest(student=dict(previous), teachers=world.teachers(B),
                                 previous=previous, heads=world.heads(A, B),
                                 settings=_settings(gamma=gamma), seed=2)
        job = DistillJob(request, TINY, world.pool, CPU)
        job.run()
        state = job.student_state()
        kept = _head_agreement(state, previous, A, task, k, world.val[A])
        own = {key: v for key, v in state.items() if not is_head_key(key, B)}
        val = world.clients[A].evaluate(EvaluateIns(own, "val")).metrics[A]["auc"]
        scores[gamma] = (kept, val)
    (kept0, val0), (kept1, val1) = scores[0.0], scores[1.0]
    assert kept1 >= 0.85 and kept1 >= kept0 + 0.3, scores
    assert val1 >= val0 + 0.02 and val1 >= start - 0.03, (start, scores)


# -- the levers: defaults unchanged ---------------------------------------------------------
def _synthetic_request(**changes: Any) -> DistillRequest:
    return synthetic_request(steps=8, eval_every=4, **changes)


def _pool() -> torch.Tensor:
    return torch.randn(100, 3, 28, 28, generator=torch.Generator().manual_seed(5))


def _final(request: DistillRequest) -> tuple[State, list[dict[str, float]]]:
    job = DistillJob(request, TINY, _pool(), CPU)
    curve = job.run()
    return job.student_state(), [{k: v for k, v in r.items() if k != "elapsed_s"}
                                 for r in curve]


def _same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_take_the_precomputed_path_bit_for_bit(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    default, default_curve = _final(_synthetic_request())
    explicit, explicit_curve = _final(_synthetic_request(augment=False, mixup_alpha=0.0))
    assert _same(default, explicit) and default_curve == explicit_curve
    job = DistillJob(_synthetic_request(), TINY, _pool(), CPU)
    assert job.frozen is None and job.train_t is not None

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("a teacher ran during a step of the precomputed path")

    monkeypatch.setattr(distill, "frozen_outputs", no_teacher)
    monkeypatch.setattr(distill, "pool_view", no_teacher)
    job.step()


def test_per_batch_targets_of_the_plain_view_match_the_precomputed_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the view made the identity, the per-batch path (teachers, confidence weights,
    features, retention, all run on the batch) gives the precomputed path's losses."""
    monkeypatch.setattr(distill, "pool_view", lambda x, rng, settings: x)
    fast = DistillJob(_synthetic_request(), TINY, _pool(), CPU)
    per_batch = DistillJob(_synthetic_request(augment=True), TINY, _pool(), CPU)
    assert per_batch.frozen is not None and per_batch.train_t is None
    assert per_batch.retained == fast.retained == ["c"]
    for _ in range(3):
        a, b = fast.step(), per_batch.step()
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name
    for name, value in fast.evaluate().items():
        assert per_batch.evaluate()[name] == pytest.approx(value, abs=1e-6)


# -- the levers: one view to teachers and student -------------------------------------------
def test_random_view_flips_and_shifts_each_image() -> None:
    x = torch.randn(64, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    out = random_view(x, np.random.default_rng(3))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(torch.cat([x, x.flip(-1)]), (2, 2, 2, 2),
                                     mode="replicate")
    kinds = set()
    for i in range(len(x)):
        found = [(flip, dy, dx) for flip in (0, 1) for dy in range(-2, 3)
                 for dx in range(-2, 3)
                 if torch.equal(out[i], padded[i + flip * len(x), :, 2 - dy:30 - dy,
                                                  2 - dx:30 - dx])]
        assert found, f"image {i} is not a flip + shift of its input"
        kinds.add(found[0])
    assert {k[0] for k in kinds} == {0, 1} and len(kinds) > 10
    assert torch.equal(out, random_view(x, np.random.default_rng(3)))


def test_mixup_mixes_pairs_of_the_batch_with_one_beta_lambda() -> None:
    x = torch.randn(16, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    out = mixup(x, np.random.default_rng(4), 0.4)
    check = np.random.default_rng(4)
    lam = float(check.beta(0.4, 0.4))
    perm = torch.from_numpy(check.permutation(16))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x[perm])
    assert 0 < lam < 1 and not torch.equal(out, x)


def test_teachers_and_student_see_the_same_view(monkeypatch: pytest.MonkeyPatch) -> None:
    job = DistillJob(_synthetic_request(augment=True, mixup_alpha=0.3), TINY, _pool(), CPU)
    to_teachers: list[torch.Tensor] = []
    to_student: list[torch.Tensor] = []
    outputs = distill.frozen_outputs

    def spy(models: Any, x: torch.Tensor, device: torch.device) -> Any:
        to_teachers.append(x.clone())
        return outputs(models, x, device)

    monkeypatch.setattr(distill, "frozen_outputs", spy)
    job.module.register_forward_pre_hook(lambda m, args: to_student.append(args[0].clone()))
    same_batch = torch.Generator().manual_seed(job.generator.initial_seed())
    idx = torch.randint(len(job.x_train), (16,), generator=same_batch)
    job.step()
    assert len(to_teachers) == len(to_student) == 1
    assert torch.equal(to_teachers[0], to_student[0])
    assert not torch.allclose(to_student[0], job.x_train[idx])  # a view, not the plain batch


def test_the_levers_are_config_keys() -> None:
    cfg = load_config(None, ["distill.augment=true", "distill.mixup_alpha=0.2"])
    assert cfg.distill.objective().augment and cfg.distill.objective().mixup_alpha == 0.2
    with pytest.raises(ValueError, match=r"distill\.mixup_alpha"):
        load_config(None, ["distill.mixup_alpha=-1"])
    with pytest.raises(ValueError, match=r"distill\.augment"):
        load_config(None, ["distill.augment=3"])


# -- the levers: deterministic, and the student still learns --------------------------------
def test_with_the_levers_the_job_is_seeded_and_the_student_learns(world: World) -> None:
    levers = {"augment": True, "mixup_alpha": 0.4}
    job = DistillJob(_stage1(world, **levers), TINY, world.pool, CPU)
    before, after, curve = _learns(job)
    assert before < 0.5 and after >= before + 0.3 and after >= 0.7, (before, after)
    assert all(np.isfinite(r["loss"]) for r in curve)
    state = job.student_state()
    short = {**levers, "steps": 10, "eval_every": 5}
    again = [DistillJob(_stage1(world, **short), TINY, world.pool, CPU) for _ in range(2)]
    other = DistillJob(_stage1(world, seed=2, **short), TINY, world.pool, CPU)
    for j in (*again, other):
        j.run()
    assert _same(again[0].student_state(), again[1].student_state())
    assert not _same(again[0].student_state(), other.student_state())
    assert not _same(state, again[0].student_state())
