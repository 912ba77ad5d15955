"""Learning-rate schedules of one local-training call, stepped once per optimisation step.

A schedule spans the epochs of one :meth:`engine.fl.client.Client.fit` call: in federated
strategies that is one round's local epochs (the schedule restarts every round); for
``local`` / ``centralised`` runs with one round and many epochs, and for
``umim bench medmnist``, it is the whole training. Epoch-valued settings (warm-up,
milestones) are turned into optimisation steps here, so a warm-up ramps within a one-epoch
fit too.

The builder takes plain arguments (``engine.nn`` sits below ``engine.config``); the client
passes the fields of :class:`~engine.config.TrainConfig` (``train.schedule``,
``train.warmup_epochs``, ``train.milestones``, ``train.gamma``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

Schedule = Literal["constant", "step", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")


def lr_factor(schedule: Schedule, total_steps: int, *, warmup_steps: int = 0,
              milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1
              ) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimisation step.

    Parameters
    ----------
    schedule
        ``constant`` (1 after the warm-up), ``step`` (times ``gamma`` at each milestone) or
        ``cosine`` (half a cosine from 1 down towards 0 over the steps after the warm-up).
    total_steps
        Optimisation steps of the whole call (epochs x batches per epoch).
    warmup_steps
        Linear warm-up: step ``t < warmup_steps`` has factor ``(t + 1) / warmup_steps``, so
        the first step already moves and step ``warmup_steps - 1`` reaches the full rate.
        Warm-up and the schedule multiply (a milestone inside the warm-up still counts).
    milestones
        ``step`` only: fractions of ``total_steps`` (strictly increasing, in (0, 1)); from
        the first step at or after ``m * total_steps`` on, the factor is multiplied by
        ``gamma`` (on an epoch start whenever ``m * epochs`` is a whole number).
    gamma
        ``step`` only: the decay at each milestone, in (0, 1].

    Returns
    -------
    Callable[[int], float]
        ``step -> factor``, as :class:`torch.optim.lr_scheduler.LambdaLR` wants it.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    check_milestones(milestones, gamma)
    # the first step at or after m * total_steps (tolerant of float error in m * total)
    boundaries = [math.ceil(m * total_steps - 1e-9) for m in milestones]
    decay_steps = total_steps - warmup_steps

    def factor(step: int) -> float:
        warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        if schedule == "step":
            return warm * gamma ** sum(step >= b for b in boundaries)
        if schedule == "cosine" and step >= warmup_steps and decay_steps > 0:
            return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))
        return warm

    return factor


def check_milestones(milestones: Sequence[float], gamma: float) -> None:
    """Raise ``ValueError`` unless ``milestones`` are strictly increasing fractions in
    (0, 1) and ``gamma`` is in (0, 1]."""
    if any(not 0.0 < m < 1.0 for m in milestones):
        raise ValueError(f"milestones must be fractions in (0, 1), got {list(milestones)}")
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, *, epochs: int,
                    steps_per_epoch: int, warmup_epochs: int = 0,
                    milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1
                    ) -> LambdaLR | None:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` for one training call, or
    ``None`` when the learning rate stays constant (``constant`` without warm-up), so that
    the default leaves training exactly as it is without a scheduler.

    Parameters
    ----------
    optimizer
        The call's optimiser (its ``lr`` is the base rate the factors multiply).
    schedule, milestones, gamma
        See :func:`lr_factor`.
    epochs, steps_per_epoch
        The call's epochs and optimisation steps per epoch.
    warmup_epochs
        Epochs of linear warm-up (``warmup_epochs * steps_per_epoch`` steps; when it is as
        long as the call or longer, the whole call is warm-up).

    Returns
    -------
    LambdaLR or None
        Call ``.step()`` after every ``optimizer.step()``.
    """
    if schedule == "constant" and warmup_epochs == 0:
        return None
    total = max(epochs * steps_per_epoch, 1)
    fn = lr_factor(schedule, total, warmup_steps=warmup_epochs * steps_per_epoch,
                   milestones=milestones, gamma=gamma)
    return LambdaLR(optimizer, fn)
