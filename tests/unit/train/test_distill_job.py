"""The plain-torch distillation job that every Ray Train worker runs (no Ray here)."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.nn.models import build_model
from engine.train.distill import DistillJob, _targets
from strategies.distill import (
    LOSS_NAMES,
    LOSS_TERMS,
    DistillRequest,
    DistillSettings,
    Teacher,
    term_weights,
)
from strategies.state import encoder_of

TINY = ModelConfig(arch="vit", hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)


def _teacher(domain: str, seed: int) -> Teacher:
    torch.manual_seed(seed)
    net = build_model(TINY, {domain: 2})
    return Teacher(cid=domain, domain=domain, task="binary", num_classes=2,
                   state={k: v.detach().clone() for k, v in net.state_dict().items()})


def test_targets_of_each_slice_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    pool = torch.randn(50, 3, 28, 28)
    teachers = [_teacher("breast", 1), _teacher("pneumonia", 2)]
    student = encoder_of(teachers[0].state)
    request = DistillRequest(student=student, teachers=teachers, previous={},
                             heads={t.domain: (t.task, 2) for t in teachers},
                             settings=DistillSettings(steps=2, batch_size=8, eval_every=1,
                                                      holdout_fraction=0.2))
    job = DistillJob(request, TINY, pool, torch.device("cpu"), rank=1, world=2)
    assert len(job.x_hold) == 10 and len(job.x_train) == 20  # 40 left, every second one
    for part, x in ((job.hold_t, job.x_hold), (job.train_t, job.x_train)):
        direct = _targets(request, TINY, x, torch.device("cpu"))
        for name in ("probs", "conf", "feats", "logits"):
            for domain in ("breast", "pneumonia"):
                torch.testing.assert_close(part[name][domain], direct[name][domain])
    losses = job.step()
    assert list(losses) == list(LOSS_NAMES)
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    weights = term_weights(request.settings)
    assert losses["loss"] == pytest.approx(sum(weights[n] * losses[n] for n in LOSS_TERMS))
