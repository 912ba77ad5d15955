from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine.nn.schedule import build_scheduler, lr_factor


def _lrs(schedule: str, epochs: int, steps_per_epoch: int, lr: float = 1e-3,
         **kwargs: object) -> list[float]:
    """The learning rate of every optimisation step of one call."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, schedule, epochs=epochs,  # type: ignore[arg-type]
                                steps_per_epoch=steps_per_epoch, **kwargs)  # type: ignore[arg-type]
    out = []
    for _ in range(epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return out


def test_step_schedule_is_medmnist_recipe() -> None:
    # MedMNIST v2: lr 1e-3, x0.1 at 50 % and at 75 % of the epochs
    lrs = _lrs("step", epochs=8, steps_per_epoch=5, milestones=(0.5, 0.75), gamma=0.1)
    per_epoch = [lrs[e * 5:(e + 1) * 5] for e in range(8)]
    assert all(len(set(e)) == 1 for e in per_epoch)  # the milestones fall on epoch starts
    assert [e[0] for e in per_epoch] == pytest.approx([1e-3] * 4 + [1e-4] * 2 + [1e-5] * 2)


def test_constant_without_warmup_builds_no_scheduler() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert build_scheduler(optimizer, "constant", epochs=3, steps_per_epoch=4) is None
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_warmup_ramps_within_a_one_epoch_call() -> None:
    lrs = _lrs("constant", epochs=1, steps_per_epoch=4, lr=1.0, warmup_epochs=1)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_after_warmup() -> None:
    lrs = _lrs("cosine", epochs=3, steps_per_epoch=2, lr=1.0, warmup_epochs=1)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    decay = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert lrs[2:] == pytest.approx(decay)
    assert all(b < a for a, b in itertools.pairwise(lrs[2:]))


def test_step_with_warmup_multiplies() -> None:
    # a milestone inside the warm-up (step 2 of 10) still counts
    f = lr_factor("step", 10, warmup_steps=4, milestones=(0.2,), gamma=0.5)
    assert [f(t) for t in range(5)] == pytest.approx([0.25, 0.5, 0.375, 0.5, 0.5])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"milestones": (0.5, 0.5)}, "strictly increasing"),
    ({"milestones": (0.0, 0.5)}, r"in \(0, 1\)"),
    ({"milestones": (0.5, 1.0)}, r"in \(0, 1\)"),
    ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lr_factor("step", 10, **kwargs)


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor("linear", 10)  # type: ignore[arg-type]
