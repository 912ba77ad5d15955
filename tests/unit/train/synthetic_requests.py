"""One synthetic distillation request for the job tests: random teachers of two domains and
a previous model with a third, retained head (every term of the objective is on, confidence
weighting too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from engine.config import ModelConfig
from engine.nn.models import build_model
from strategies.distill import DistillRequest, DistillSettings, Teacher

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
TEACHERS = (("a", "multi-class", 3), ("a", "multi-class", 3), ("b", "binary", 2))
"""Teachers c0 and c1 of domain ``a``, c2 of ``b``."""


def synthetic_request(*, steps: int, eval_every: int,
                      sample_weights: Mapping[str, torch.Tensor | None] | None = None,
                      **changes: Any) -> DistillRequest:
    """The request; ``sample_weights``: teacher id -> its per-pool-image weights;
    ``changes``: settings beside the defaults here."""
    weights = sample_weights or {}
    teachers = []
    for i, (domain, task, k) in enumerate(TEACHERS):
        torch.manual_seed(i + 1)
        state = dict(build_model(TINY, {domain: k}).state_dict())
        teachers.append(Teacher(cid=f"c{i}", domain=domain, task=task, num_classes=k,
                                state=state, weight=float(i + 1),
                                sample_weights=weights.get(f"c{i}")))
    torch.manual_seed(9)
    previous = dict(build_model(TINY, {"a": 3, "b": 2, "c": 4}).state_dict())
    settings = DistillSettings(**{**dict(steps=steps, batch_size=16, eval_every=eval_every,
                                         patience=5, holdout_fraction=0.2,
                                         weighting="confidence", beta=0.5, gamma=1.0),
                                  **changes})
    return DistillRequest(student=dict(previous), teachers=teachers, previous=previous,
                          heads={"a": ("multi-class", 3), "b": ("binary", 2),
                                 "c": ("multi-label", 4)}, settings=settings, seed=7)
