"""Distillation: precision honoured (CPU bf16 stands in for CUDA), and no silent fallbacks
(a head nobody trained, a non-finite student). No Ray here."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import engine.train.distill as distill
from engine.config import DataConfig, ModelConfig
from engine.nn.models import build_model
from engine.train.distill import CURVE_FIELDS, CURVE_KEY, DistillJob, RayTrainDistiller
from strategies.distill import DistillRequest, DistillSettings, Teacher
from strategies.state import encoder_of, head_of

TINY = ModelConfig(arch="vit", hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)
SETTINGS = DistillSettings(steps=4, batch_size=8, eval_every=2, holdout_fraction=0.2)


def _teacher(domain: str, seed: int) -> Teacher:
    torch.manual_seed(seed)
    net = build_model(TINY, {domain: 2})
    return Teacher(cid=domain, domain=domain, task="binary", num_classes=2,
                   state={k: v.detach().clone() for k, v in net.state_dict().items()})


def _request(heads: tuple[str, ...] = ("breast", "pneumonia"),
             taught: tuple[str, ...] = ("breast", "pneumonia"),
             student: dict[str, torch.Tensor] | None = None) -> DistillRequest:
    teachers = [_teacher(d, i + 1) for i, d in enumerate(taught)]
    return DistillRequest(student=student or encoder_of(teachers[0].state), teachers=teachers,
                          previous={}, heads={d: ("binary", 2) for d in heads},
                          settings=SETTINGS, tag="test-round")


def _pool() -> torch.Tensor:
    return torch.randn(40, 3, 28, 28, generator=torch.Generator().manual_seed(0))


def _watch(job: DistillJob) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    layer = job.module.net.encoder.vit.blocks[0].mlp.linear1
    layer.register_forward_hook(lambda m, a, out: seen.append(out.dtype)
                                if m.training else None)  # training steps only
    return seen


# -- precision -----------------------------------------------------------------------------
def test_distillation_runs_in_bf16_on_cpu() -> None:
    job = DistillJob(_request(), TINY, _pool(), torch.device("cpu"), precision="bf16")
    assert job.use_bf16
    seen = _watch(job)
    losses = job.step()
    assert seen == [torch.bfloat16] and all(math.isfinite(v) for v in losses.values())
    curve = job.run()
    assert set(seen) == {torch.bfloat16}
    assert curve and all(math.isfinite(r["loss"]) and 0 <= r["agreement"] <= 1 for r in curve)
    assert all(torch.isfinite(v).all() for v in job.student_state().values())


def test_auto_on_cpu_is_float32_bit_for_bit() -> None:
    request = _request()
    auto = DistillJob(request, TINY, _pool(), torch.device("cpu"))
    fp32 = DistillJob(request, TINY, _pool(), torch.device("cpu"), precision="fp32")
    assert not auto.use_bf16
    seen = _watch(auto)
    for _ in range(3):
        assert auto.step() == fp32.step()
    assert set(seen) == {torch.float32}
    a, f = auto.student_state(), fp32.student_state()
    assert all(torch.equal(a[k], f[k]) for k in a)


def test_the_distiller_hands_the_precision_to_its_workers(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(distill, "fit_trainer",
                        lambda loop, config, **kw: seen.update(config) or _result())
    monkeypatch.setattr(distill, "load_checkpoint_state", lambda c: _reported(finite=True))
    distiller = RayTrainDistiller(TINY, DataConfig(domains=("breast",)), "/tmp/x",
                                  precision="bf16")
    distiller.distil(_request())
    assert seen["precision"] == "bf16"
    with pytest.raises(ValueError, match="fp8"):  # a bad name fails in the driver
        RayTrainDistiller(TINY, DataConfig(domains=("breast",)), "/tmp/x", precision="fp8")


# -- no silent fallbacks -------------------------------------------------------------------
def test_a_head_nobody_trained_is_an_error() -> None:
    # pneumonia: no teacher this round and no head in the previous global model
    request = _request(taught=("breast",))
    with pytest.raises(ValueError, match="pneumonia"):
        DistillJob(request, TINY, _pool(), torch.device("cpu"))
    assert distill.untrained_heads(request) == ["pneumonia"]


def test_a_head_of_the_previous_global_model_needs_no_teacher() -> None:
    first = _request()
    previous = {**first.student, **head_of(_teacher("pneumonia", 5).state, "pneumonia")}
    request = _request(taught=("breast",), student=previous)
    assert distill.untrained_heads(request) == []
    job = DistillJob(request, TINY, _pool(), torch.device("cpu"))
    assert set(job.module.net.heads) == {"breast", "pneumonia"}


def test_the_distiller_refuses_an_untrained_head_before_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distill, "fit_trainer", lambda *a, **k: pytest.fail("it started"))
    distiller = RayTrainDistiller(TINY, DataConfig(domains=("breast",)), "/tmp/x")
    with pytest.raises(ValueError, match=r"test-round.*pneumonia"):
        distiller.distil(_request(taught=("breast",)))


def _result() -> Any:
    return SimpleNamespace(checkpoint="checkpoint")


def _reported(finite: bool) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in build_model(TINY, {"breast": 2, "pneumonia": 2})
             .state_dict().items()}
    if not finite:
        state["heads.pneumonia.weight"][0, 0] = math.nan
        state["encoder.vit.norm.bias"][0] = math.inf
    row = [1.0] * len(CURVE_FIELDS)
    return {**state, CURVE_KEY: torch.tensor([row])}


def test_check_finite_names_the_nonfinite_tensors() -> None:
    state = _reported(finite=False)
    state.pop(CURVE_KEY)
    with pytest.raises(ValueError, match=r"encoder\.vit\.norm\.bias, heads\.pneumonia\.weight"):
        distill.check_finite(state, "the student")
    assert distill.check_finite(_reported(finite=True), "the student")


def test_the_distiller_refuses_a_nonfinite_student(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.fl.simulation import RunError

    monkeypatch.setattr(distill, "fit_trainer", lambda *a, **k: _result())
    monkeypatch.setattr(distill, "load_checkpoint_state", lambda c: _reported(finite=False))
    distiller = RayTrainDistiller(TINY, DataConfig(domains=("breast",)), "/tmp/x")
    with pytest.raises(RunError, match=r"test-round.*heads\.pneumonia\.weight"):
        distiller.distil(_request())
    monkeypatch.setattr(distill, "load_checkpoint_state", lambda c: _reported(finite=True))
    assert distiller.distil(_request()).metrics["distill_steps"] == 1.0


def test_the_distiller_refuses_a_job_that_reported_no_student(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distill, "fit_trainer", lambda *a, **k: SimpleNamespace(checkpoint=None))
    distiller = RayTrainDistiller(TINY, DataConfig(domains=("breast",)), "/tmp/x")
    with pytest.raises(ValueError, match="no student"):
        distiller.distil(_request())
