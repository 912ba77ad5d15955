"""Multi-teacher distillation: the objective as pure torch functions, and the request the
universal strategy hands to the engine's trainer.

For a batch of unlabelled pool images, with student heads ``s_d``, teacher logits ``t_d``
(averaged over the teachers of domain ``d``), temperature ``T`` and teacher weights ``w_d``::

    L = sum_d w_d * T^2 * KL(softmax(t_d / T) || softmax(s_d / T))
      + beta  * mean_d (1 - cos(P_d(f_student), f_teacher_d))      # feature matching
      + gamma * sum_p T^2 * KL(softmax(g_p / T) || softmax(s_p / T)) / |p|   # retention
      + mae_weight * MAE(student encoder, pool batch)                          # MIM kept

where ``g_p`` are the previous global model's heads for the domains not taught this time,
and ``MAE`` is the masked-autoencoder loss of the MIM base's objective (masked-patch MSE of
normalised pixels) computed by the engine with the student's encoder and the base's decoder
(``distill.mae_weight``, off by default), so the encoder keeps what MIM gave it.

Multi-label heads use a per-label binary KL of sigmoids instead of the softmax KL. With
function matching on (``augment``, ``mixup_alpha``), the batch is a random view of pool
images, the same one for the student, the teachers and the previous global model.

Per-sample relevance (FedAUX-style, ``strategy.relevance``): a teacher may carry
``sample_weights``, one non-negative weight per pool image (its client's score of how much
the image looks like its own data). The exact rule, for teacher ``i`` of domain ``d`` with
example weight ``w_i`` (normalised over the domain) and pool image ``n``:

* ``r_i(n) = sample_weights_i(n) / mean_pool(sample_weights_i)`` (a teacher without weights:
  ``r_i = 1``), so the mean weight over the whole pool is 1;
* ``a_i(n) = w_i * r_i(n)``; the domain's relevance is ``rho_d(n) = sum_i a_i(n)`` (its
  pool mean is 1 again), and the teachers of ``d`` are mixed per image with the weights
  ``a_i(n) / rho_d(n)`` (``w_i`` where ``rho_d(n) = 0``) -- for the KL this equals
  weighting each teacher's own KD term by ``a_i(n)`` (up to a constant);
* the KD term of domain ``d`` on image ``n`` is multiplied by ``rho_d(n)`` on top of the
  uniform / confidence weight among domains, and so is its feature-matching term:

      kd      = sum_d mean_n w_d(n) * rho_d(n) * T^2 * KL_d(n)
      feature = mean_d mean_n rho_d(n) * (1 - cos_d(n))

  Retention is not weighted. A mixed image (mixup) has the mixed weights
  ``lambda * r_i(n) + (1 - lambda) * r_i(perm(n))``; a random view keeps its image's.

Without sample weights (the default) nothing of this runs and the objective is as above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from strategies.types import PoolOutputs, State, TaskType

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


def normalised_sample_weights(weights: torch.Tensor) -> torch.Tensor:
    """A teacher's per-pool-image weights divided by their mean over the pool (float32),
    so they average 1: ``r_i`` of the module docstring."""
    w = weights.float()
    return w / w.mean()


def domain_relevance(example_weights: torch.Tensor, relevance: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image mixing of one domain's teachers and the domain's relevance.

    Parameters
    ----------
    example_weights
        ``(T,)`` the teachers' example weights, summing to 1 over the domain (``w_i``).
    relevance
        ``(T, B)`` their normalised sample weights on the batch's images (``r_i``).

    Returns
    -------
    tuple
        ``(mix, rho)``: ``(T, B)`` weights summing to 1 over the teachers for every image
        (``a_i / rho``; ``w_i`` where ``rho`` is 0) and ``(B,)`` ``rho = sum_i w_i r_i``.
    """
    base = example_weights.to(relevance).reshape(-1, 1)
    a = base * relevance
    rho = a.sum(dim=0)
    mix = torch.where(rho > 0, a / rho.clamp_min(torch.finfo(a.dtype).tiny),
                      base.expand_as(a))
    return mix, rho


def feature_matching(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between projected student features and teacher features, ``(B,)``."""
    return 1.0 - F.cosine_similarity(projected.float(), teacher.float(), dim=1)


def agreement(student: torch.Tensor, teacher: torch.Tensor, task: TaskType) -> torch.Tensor:
    """Fraction of samples (labels, for multi-label) where student and teacher predict alike."""
    if task == "multi-label":
        return ((student > 0) == (teacher > 0)).float().mean()
    return (student.argmax(dim=1) == teacher.argmax(dim=1)).float().mean()


LOSS_TERMS: tuple[str, ...] = ("kd", "feature", "retention", "mae")
"""The terms of the objective by name, in order; ``loss`` is their weighted sum. Curves,
Train reports and plots are built from these names, so a new term is added here only."""

LOSS_NAMES: tuple[str, ...] = (*LOSS_TERMS, "loss")
"""Every named value :func:`distillation_loss` returns."""


def term_weights(settings: DistillSettings) -> dict[str, float]:
    """The weight of each term of :data:`LOSS_TERMS` in the loss."""
    return {"kd": 1.0, "feature": settings.beta, "retention": settings.gamma,
            "mae": settings.mae_weight}


def distillation_loss(logits: Mapping[str, torch.Tensor], projected: Mapping[str, torch.Tensor],
                      *, teacher_probs: Mapping[str, torch.Tensor],
                      teacher_features: Mapping[str, torch.Tensor],
                      previous_probs: Mapping[str, torch.Tensor], weights: torch.Tensor,
                      tasks: Mapping[str, TaskType], settings: DistillSettings,
                      sample_weights: Mapping[str, torch.Tensor] | None = None,
                      mae: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The objective on one batch, term by term (see the module docstring).

    Parameters
    ----------
    logits, projected
        The student's logits per head and its projected features per taught domain.
    teacher_probs, teacher_features
        Per taught domain: the teachers' tempered probabilities and features (the batch's
        rows); their keys, in order, are the taught domains.
    previous_probs
        Per retained domain: the previous global model's tempered probabilities.
    weights
        ``(D, B)`` teacher weights of the taught domains (see :func:`teacher_weights`).
    tasks
        Domain -> task type.
    settings
        Temperature and term weights.
    sample_weights
        Per taught domain, its relevance ``rho_d`` ``(B,)`` on the batch's images (see the
        module docstring); a domain not in it (and ``None``, the default) weighs every
        image 1. It scales the domain's KD and feature-matching terms per image.
    mae
        The masked-autoencoder loss of the student's encoder on the batch (computed by the
        trainer, weighted by ``settings.mae_weight``); ``None`` (the default): 0.

    Returns
    -------
    dict
        One scalar per name of :data:`LOSS_NAMES`.
    """
    taught = list(teacher_probs)
    t = settings.temperature
    if sample_weights:
        rel = {d: sample_weights[d] for d in taught if d in sample_weights}
        kd = sum((weights[i] * _relevant(rel, d, kd_per_sample(logits[d], teacher_probs[d],
                                                                t, tasks[d]))).mean()
                 for i, d in enumerate(taught))
        feature = sum(_relevant(rel, d, feature_matching(projected[d], teacher_features[d]))
                      .mean() for d in taught) / len(taught)
    else:  # today's objective, untouched
        kd = sum((weights[i] * kd_per_sample(logits[d], teacher_probs[d], t, tasks[d])).mean()
                 for i, d in enumerate(taught))
        feature = sum(feature_matching(projected[d], teacher_features[d]).mean()
                      for d in taught) / len(taught)
    retained = list(previous_probs)
    zero = next(iter(logits.values())).new_zeros((), dtype=torch.float32)
    retention = (sum(kd_per_sample(logits[d], previous_probs[d], t, tasks[d]).mean()
                     for d in retained) / len(retained) if retained else zero)
    terms: dict[str, torch.Tensor] = {"kd": kd, "feature": feature, "retention": retention,
                                      "mae": zero if mae is None else mae.float()}
    terms["loss"] = sum(w * terms[name] if w != 1.0 else terms[name]
                        for name, w in term_weights(settings).items()
                        if w != 0.0 or name != "mae")
    return terms


def _relevant(rel: Mapping[str, torch.Tensor], domain: str, per_sample: torch.Tensor
              ) -> torch.Tensor:
    """``per_sample`` ``(B,)`` scaled by the domain's relevance, when it has one."""
    r = rel.get(domain)
    return per_sample if r is None else r.to(per_sample) * per_sample


@dataclass(frozen=True)
class DistillSettings:
    """Knobs of the distillation objective and its stopping rule (``distill.*`` in the
    experiment config; how the job is spread over workers is the engine's business).

    ``augment`` and ``mixup_alpha`` are the function-matching levers (Beyer et al., 2022):
    every training batch of the pool gets a random view (``augment``: a random horizontal
    flip and a random translation of up to 2 pixels per image) and / or is mixed with a
    permutation of itself (``mixup_alpha > 0``: one ``lambda ~ Beta(alpha, alpha)`` per
    batch), and the frozen teachers and the previous global model then see the very images
    the student sees, so their outputs are computed per batch. Both off (the defaults): the
    teachers' outputs are computed once per pool image, as without the levers. The held-out
    stopping signal is always measured on the plain pool images.

    ``mae_weight`` keeps the MIM objective during distillation: the student's encoder also
    reconstructs masked patches of each batch (the base's mask ratio) through the MIM base's
    decoder, which trains with it; 0 (the default) leaves the objective as it was.
    """

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
    augment: bool = False
    mixup_alpha: float = 0.0
    mae_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.beta < 0 or self.gamma < 0:
            raise ValueError("distill.temperature must be > 0; beta and gamma >= 0")
        if self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("distill.steps, eval_every and patience must be >= 1")
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError("distill.holdout_fraction must be in (0, 0.5)")
        if not isinstance(self.augment, bool):
            raise ValueError(f"distill.augment must be true or false, got {self.augment!r}")
        if not (math.isfinite(self.mixup_alpha) and self.mixup_alpha >= 0):
            raise ValueError(f"distill.mixup_alpha must be a finite number >= 0 (0: no mixup), "
                             f"got {self.mixup_alpha}")
        if not (math.isfinite(self.mae_weight) and self.mae_weight >= 0):
            raise ValueError(f"distill.mae_weight must be a finite number >= 0 (0: no MAE "
                             f"term), got {self.mae_weight}")

    @property
    def per_batch_targets(self) -> bool:
        """Whether the teachers see each batch's own view (``augment`` or mixup on), so their
        outputs are computed per batch instead of once per pool image."""
        return self.augment or self.mixup_alpha > 0


@dataclass(frozen=True)
class Teacher:
    """One client's fine-tuned model, as weights (encoder and the head of ``domain``) or, in
    ``privacy.transfer: predictions``, as its outputs on the pool (the model stays home).

    Attributes
    ----------
    cid, domain, task, num_classes
        Whose model, which head, its task and width.
    state
        Encoder and ``domain``'s head.
    weight
        Its weight among the teachers of its domain (e.g. the client's training examples).
    sample_weights
        ``(pool size,)`` non-negative weights, one per image of the server's pool in the
        order the distillation reads it, not all zero (the client's pool scores); the
        objective weights this teacher's targets per image by them, normalised to mean 1
        (see the module docstring). ``None`` (the default): every image weighs 1.
    outputs
        The teacher's outputs on the pool, in the order the distillation reads it (features
        and at least ``domain``'s logits), instead of weights: ``state`` is then empty and
        the trainer uses these rows as the teacher's targets, running no teacher network.
    arch
        The encoder family of ``state`` when it is not the global model's (the client's
        declared :attr:`~strategies.types.ClientInfo.arch`); ``None``: the global model's.
    """

    cid: str
    domain: str
    task: TaskType
    num_classes: int
    state: State
    weight: float = 1.0
    sample_weights: torch.Tensor | None = None
    outputs: PoolOutputs | None = None
    arch: str | None = None

    def __post_init__(self) -> None:
        if self.outputs is not None:
            where = f"teacher {self.cid}/{self.domain}"
            if self.state:
                raise ValueError(f"{where}: carries both weights and pool outputs")
            logits = self.outputs.logits.get(self.domain)
            if logits is None or logits.shape[1] != self.num_classes:
                got = None if logits is None else tuple(logits.shape)
                raise ValueError(f"{where}: pool outputs need ({len(self.outputs)}, "
                                 f"{self.num_classes}) logits of its domain, got {got}")
        w = self.sample_weights
        if w is None:
            return
        where = f"teacher {self.cid}/{self.domain}: sample_weights"
        if not isinstance(w, torch.Tensor) or w.ndim != 1 or not w.is_floating_point():
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{where} must be a 1-D float tensor (one weight per pool "
                             f"image), got {shape}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"{where} must be finite and >= 0")
        if not bool((w > 0).any()):
            raise ValueError(f"{where} are all zero: the teacher would teach nothing")


@dataclass
class DistillRequest:
    """Everything the trainer needs, as weights and settings only (never client data).

    Attributes
    ----------
    student
        The student's starting weights: the current global encoder and its heads.
    teachers
        The teachers of this round (a teacher's ``sample_weights``, if any, are indexed by
        the images of the pool the trainer reads, in its order).
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


class DistillService(Protocol):
    """What the engine provides to a strategy that distils (implemented on Ray Train)."""

    def distil(self, request: DistillRequest) -> DistillResult:
        """Run the distillation of ``request`` and return the distilled student."""
        ...
