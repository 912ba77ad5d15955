"""Multi-teacher distillation: the objective as pure torch functions, and the request the
universal strategy hands to the engine's trainer.

For a batch of unlabelled pool images, with student heads ``s_d``, teacher logits ``t_d``
(averaged over the teachers of domain ``d``), temperature ``T`` and teacher weights ``w_d``::

    L = sum_d w_d * T^2 * KL(softmax(t_d / T) || softmax(s_d / T))
      + beta  * mean_d (1 - cos(P_d(f_student), f_teacher_d))      # feature matching
      + gamma * sum_p T^2 * KL(softmax(g_p / T) || softmax(s_p / T)) / |p|   # retention

where ``g_p`` are the previous global model's heads for the domains not taught this time.
Multi-label heads use a per-label binary KL of sigmoids instead of the softmax KL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from strategies.types import State, TaskType

Weighting = Literal["uniform", "confidence"]


def kd_per_sample(student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
                  task: TaskType) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` per sample, ``(B,)``.

    ``teacher_probs`` are the teacher's tempered probabilities (softmax, or sigmoid for
    multi-label, of ``logits / T``), so several teachers can be averaged beforehand.
    """
    t2 = temperature**2
    s = student.float() / temperature
    if task == "multi-label":
        p = teacher_probs.clamp(1e-6, 1 - 1e-6)
        log_q1, log_q0 = F.logsigmoid(s), F.logsigmoid(-s)
        kl = p * (p.log() - log_q1) + (1 - p) * ((1 - p).log() - log_q0)
        return t2 * kl.mean(dim=1)
    log_q = F.log_softmax(s, dim=1)
    p = teacher_probs.clamp_min(1e-8)
    return t2 * (p * (p.log() - log_q)).sum(dim=1)


def tempered_probs(logits: torch.Tensor, temperature: float, task: TaskType) -> torch.Tensor:
    """Softmax (sigmoid for multi-label) of ``logits / T``."""
    z = logits.float() / temperature
    return torch.sigmoid(z) if task == "multi-label" else torch.softmax(z, dim=1)


def confidence(logits: torch.Tensor, task: TaskType) -> torch.Tensor:
    """A teacher's confidence per sample in ``[0, 1]``: max probability, rescaled so that a
    uniform guess is 0 (multi-label: mean ``|2p - 1|``)."""
    if task == "multi-label":
        return (2 * torch.sigmoid(logits.float()) - 1).abs().mean(dim=1)
    probs = torch.softmax(logits.float(), dim=1)
    k = probs.shape[1]
    return ((probs.max(dim=1).values - 1 / k) / (1 - 1 / k)).clamp(0, 1)


def teacher_weights(confidences: torch.Tensor, mode: Weighting) -> torch.Tensor:
    """Weights ``(D, B)`` summing to 1 over the ``D`` teacher domains for every sample.

    ``uniform``: ``1 / D``; ``confidence``: proportional to each teacher's confidence on the
    sample (a pool image counts most for the domains whose teachers recognise it).
    """
    d = confidences.shape[0]
    if mode == "uniform":
        return torch.full_like(confidences, 1.0 / d)
    if mode == "confidence":
        c = confidences.clamp_min(1e-6)
        return c / c.sum(dim=0, keepdim=True)
    raise ValueError(f"unknown teacher weighting {mode!r}; use 'uniform' or 'confidence'")


def feature_matching(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between projected student features and teacher features, ``(B,)``."""
    return 1.0 - F.cosine_similarity(projected.float(), teacher.float(), dim=1)


def agreement(student: torch.Tensor, teacher: torch.Tensor, task: TaskType) -> torch.Tensor:
    """Fraction of samples (labels, for multi-label) where student and teacher predict alike."""
    if task == "multi-label":
        return ((student > 0) == (teacher > 0)).float().mean()
    return (student.argmax(dim=1) == teacher.argmax(dim=1)).float().mean()


@dataclass(frozen=True)
class TrainScaling:
    """How a server-side Ray Train job is spread: ``num_workers`` DDP workers with
    ``cpus_per_worker`` CPUs each and, when ``use_gpu``, ``gpus_per_worker`` GPUs each
    (fractions share a device with the client actors)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0

    def check_scaling(self, knob: str) -> None:
        """Raise ``ValueError`` naming ``knob`` (the config section) for bad scaling."""
        if self.num_workers < 1:
            raise ValueError(f"{knob}.num_workers must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"{knob}.cpus_per_worker must be > 0")
        if self.use_gpu and not 0 < self.gpus_per_worker <= 8:
            raise ValueError(f"{knob}.gpus_per_worker must be in (0, 8]")


@dataclass(frozen=True)
class DistillSettings(TrainScaling):
    """Knobs of the distillation (``distill.*`` in the experiment config)."""

    temperature: float = 4.0
    beta: float = 0.1
    gamma: float = 1.0
    weighting: Weighting = "uniform"
    steps: int = 300
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 128
    eval_every: int = 50
    patience: int = 3
    holdout_fraction: float = 0.1

    def __post_init__(self) -> None:
        self.check_scaling("distill")
        if self.temperature <= 0 or self.beta < 0 or self.gamma < 0:
            raise ValueError("distill.temperature must be > 0; beta and gamma >= 0")
        if self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("distill.steps, eval_every and patience must be >= 1")
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError("distill.holdout_fraction must be in (0, 0.5)")


@dataclass(frozen=True)
class Teacher:
    """One client's fine-tuned model, as weights: encoder and the head of ``domain``."""

    cid: str
    domain: str
    task: TaskType
    num_classes: int
    state: State
    weight: float = 1.0


@dataclass
class DistillRequest:
    """Everything the trainer needs, as weights and settings only (never client data).

    Attributes
    ----------
    student
        The student's starting weights: the current global encoder and its heads.
    teachers
        The teachers of this round.
    previous
        The previous global model (encoder and heads) for the retention term, or empty.
    heads
        Every head the student must have at the end: domain -> (task, num_classes).
    settings
        Distillation knobs.
    seed
        Seed of the trainer's sampling.
    tag
        Name of this distillation (folder of its checkpoints), e.g. ``"round-0002"``.
    server_round
        The round it belongs to (0 outside the round loop).
    """

    student: State
    teachers: Sequence[Teacher]
    previous: State
    heads: Mapping[str, tuple[TaskType, int]]
    settings: DistillSettings
    seed: int = 0
    tag: str = "distill"
    server_round: int = 0


@dataclass
class DistillResult:
    """The distilled global model and the curve of the label-free stopping signal."""

    state: State
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)


class DistillService:
    """What the engine provides to a strategy that distils (implemented on Ray Train)."""

    def distil(self, request: DistillRequest) -> DistillResult:  # pragma: no cover - interface
        """Run the distillation of ``request`` and return the distilled student."""
        raise NotImplementedError
