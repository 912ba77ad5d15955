"""Multi-teacher distillation of client models into the global model, on Ray Train.

The trainer receives the teachers as weights (never client data), the student's starting
weights and the previous global model; it trains the student on the server's unlabelled
pool with the objective of :mod:`strategies.distill` (DDP over ``distill.num_workers``), and
stops on a label-free signal: student/teacher agreement on a held-out slice of the pool.
The best student so far is reported as a checkpoint after every evaluation. The student's
forward pass runs as ``train.precision`` says (:mod:`engine.nn.precision`); the frozen
teachers run in float32. A head that no teacher trained and no previous global model
holds, and a student with NaN or Inf tensors, are errors, never results.

The teachers' outputs are computed once per pool image, unless function matching is on
(``distill.augment``, ``distill.mixup_alpha``): then every batch is a random view of pool
images (:func:`pool_view`) and the frozen teachers and previous model run on that same view
per batch, confidence weights and feature targets included.

Teachers with ``sample_weights`` (per-sample relevance, :mod:`strategies.distill`) have them
indexed by the pool the job is given: on either path each image carries its teachers'
normalised weights (a mixed image the lambda-mix of its two images'), which mix the
teachers of a domain per image and scale that domain's KD and feature terms.

Teachers may instead come as their outputs on the pool (``privacy.transfer: predictions``,
:attr:`~strategies.distill.Teacher.outputs`, one row per pool image, computed by the client
in one pass): their rows of the job's images are the targets and no teacher network runs;
function matching is refused for them (they never saw a random view). A teacher given as
weights of another encoder family (``model.domain_arch``) is built in its family; the
student's feature projection of a domain maps to its teachers' feature width.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DataConfig, ModelConfig, PretrainConfig, TrainScaling
from engine.fl.simulation import RunError
from engine.nn.models import MultiHeadNet, build_model
from engine.nn.precision import (
    autocast,
    autocast_dtype,
    check_precision,
    grad_scaler,
    optimizer_step,
)
from engine.train.launch import fit_trainer, load_checkpoint_state, report, unwrap
from engine.train.mim import build_mae, load_pool, mae_loss, tie_mae
from strategies.aggregate import nonfinite_keys
from strategies.distill import (
    LOSS_NAMES,
    DistillRequest,
    DistillResult,
    DistillService,
    DistillSettings,
    Teacher,
    agreement,
    confidence,
    distillation_loss,
    domain_relevance,
    normalised_sample_weights,
    teacher_weights,
    tempered_probs,
)
from strategies.state import encoder_of, head_of, heads_of, is_head_key
from strategies.types import TaskType

logger = logging.getLogger(__name__)

CURVE_KEY = "_curve"
CURVE_FIELDS = ("step", *LOSS_NAMES, "agreement", "best_agreement", "elapsed_s")
"""The columns of a distillation curve: the loss terms by name (see
:data:`strategies.distill.LOSS_NAMES`) and the stopping signal."""


class DistillError(RunError, ValueError):
    """A distillation whose result would not be true: a head nobody trained, a student with
    NaN or Inf tensors, or no student at all. The run stops (``umim``: a one-line run error)."""


class Student(nn.Module):
    """The global model plus one feature projection per taught domain (not exported) and,
    with the MAE term on, the MIM base's masked autoencoder tied to the global encoder
    (:func:`engine.train.mim.tie_mae`; its decoder is not exported either)."""

    def __init__(self, net: MultiHeadNet, projected: list[str],
                 mae: nn.Module | None = None, patch_size: int = 0,
                 precision: str = "auto", widths: dict[str, int] | None = None) -> None:
        super().__init__()
        self.net = net
        width = net.out_features
        widths = widths or {}  # a teacher of another family has features of its own width
        self.proj = nn.ModuleDict({d: nn.Linear(width, widths.get(d, width))
                                   for d in projected})
        self.mae = mae
        self.patch_size, self.precision = patch_size, precision

    def forward(self, x: torch.Tensor, *, reconstruct: bool = False
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor],
                           torch.Tensor | None]:
        """Features, logits per head, projected features per taught domain, and (when
        ``reconstruct`` and the student has an MAE) the MAE loss of the encoder on ``x``
        (in the same forward pass, so data parallelism sees every parameter once)."""
        features = self.net.features(x)
        logits = {d: head(features) for d, head in self.net.heads.items()}
        projected = {d: p(features) for d, p in self.proj.items()}
        rec = (mae_loss(self.mae, x, self.patch_size, self.precision)
               if reconstruct and self.mae is not None else None)
        return features, logits, projected, rec


def _frozen(model_cfg: ModelConfig, heads: dict[str, int], state: dict[str, torch.Tensor],
            device: torch.device) -> MultiHeadNet:
    net = build_model(model_cfg, heads)
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net.to(device)


class FrozenModels:
    """The frozen networks of a request: every taught domain's teachers with their weights
    (normalised over the domain) and the previous global model with the heads it retains
    (none when there is no previous model or ``gamma`` is 0).

    Networks are built when first run, teachers by domain in sorted order and then the
    previous model (the order, and so the global RNG draws, of building them all at once).
    With ``keep`` every network is held once built (function matching runs them every
    step); without, each is dropped once run, so one teacher at a time is in memory.
    """

    def __init__(self, request: DistillRequest, model_cfg: ModelConfig, device: torch.device,
                 *, keep: bool = False) -> None:
        s = request.settings
        by_domain: dict[str, list[Teacher]] = defaultdict(list)
        for t in request.teachers:
            by_domain[t.domain].append(t)
        self.request, self.model_cfg, self.device, self.keep = request, model_cfg, device, keep
        self.temperature = s.temperature
        self.tasks: dict[str, TaskType] = {}
        self.groups: dict[str, list[tuple[float, Teacher]]] = {}
        for domain, group in sorted(by_domain.items()):
            self.tasks[domain] = group[0].task
            total = sum(t.weight for t in group)
            self.groups[domain] = [(t.weight / total, t) for t in group]
        retained = [d for d in request.heads if d not in by_domain
                    and head_of(request.previous, d)]
        self.retained: list[str] = retained if retained and s.gamma > 0 else []
        self.tasks |= {d: request.heads[d][0] for d in self.retained}
        self._nets: dict[tuple[str, int], MultiHeadNet] = {}
        self.pool_size: int | None = None  # set by the job: its pool's length

    def _net(self, key: tuple[str, int], build: Callable[[], MultiHeadNet]) -> MultiHeadNet:
        net = self._nets.get(key)
        if net is None:
            net = build()
            if self.keep:
                self._nets[key] = net
        return net

    def teachers(self, domain: str) -> Iterator[tuple[float, MultiHeadNet]]:
        """``(weight, network)`` of each teacher of ``domain`` given as weights, in order,
        each built in its own encoder family (:attr:`~strategies.distill.Teacher.arch`)."""
        for i, (weight, t) in enumerate(self.groups[domain]):
            if t.outputs is not None:
                continue
            yield weight, self._net((domain, i), lambda t=t: _frozen(
                self.model_cfg.for_arch(t.arch), {domain: t.num_classes},
                {**encoder_of(t.state), **head_of(t.state, domain)}, self.device))

    def teacher_outputs(self, domain: str, x: torch.Tensor, rows: torch.Tensor | None,
                        chunk: int = 1024
                        ) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        """``(weight, logits, features)`` of each teacher of ``domain`` on images ``x``, in
        order (float32, on the job's device): a teacher given as weights runs on ``x``; one
        given as pool outputs (``privacy.transfer: predictions``) gives its rows ``rows``
        (the pool indices of ``x``'s images), and no network runs.

        Raises
        ------
        DistillError
            For a teacher of pool outputs without ``rows`` (a random view of the pool, which
            it never saw), or whose outputs are not one row per pool image.
        """
        nets = self.teachers(domain)
        for weight, t in self.groups[domain]:
            if t.outputs is None:
                _, net = next(nets)
                out_l, out_f = [], []
                for i in range(0, len(x), chunk):
                    f = net.features(x[i:i + chunk].to(self.device)).float()
                    out_f.append(f)
                    out_l.append(net.heads[domain](f))
                yield weight, torch.cat(out_l), torch.cat(out_f)
                continue
            if rows is None:
                raise DistillError(f"teacher {t.cid}/{domain} is given as pool outputs, which "
                                   "cover the plain pool images only (no random view)")
            if len(t.outputs) != self.pool_size:
                raise DistillError(f"teacher {t.cid}/{domain}: {len(t.outputs)} rows of pool "
                                   f"outputs for a pool of {self.pool_size} images")
            yield (weight, t.outputs.logits[domain][rows].float().to(self.device),
                   t.outputs.features[rows].float().to(self.device))

    def relevance(self, pool_size: int) -> dict[str, torch.Tensor]:
        """Per taught domain with a teacher that has ``sample_weights``: ``(T, pool_size)``
        normalised weights of its teachers in order (1 for a teacher without), on the CPU.
        Empty when no teacher has any (the default).

        Raises
        ------
        DistillError
            For sample weights whose length is not the pool's.
        """
        out: dict[str, torch.Tensor] = {}
        for domain, group in self.groups.items():
            if all(t.sample_weights is None for _, t in group):
                continue
            rows = []
            for _, t in group:
                w = t.sample_weights
                if w is None:
                    rows.append(torch.ones(pool_size))
                    continue
                if len(w) != pool_size:
                    raise DistillError(f"teacher {t.cid}/{domain}: {len(w)} sample weights "
                                       f"for a pool of {pool_size} images")
                rows.append(normalised_sample_weights(w.detach().cpu()))
            out[domain] = torch.stack(rows)
        return out

    def previous(self) -> MultiHeadNet | None:
        """The previous global model with the retained heads, or ``None``."""
        if not self.retained:
            return None
        prev = self.request.previous
        return self._net(("", -1), lambda: _frozen(
            self.model_cfg, {d: self.request.heads[d][1] for d in self.retained},
            {**encoder_of(prev), **heads_of(prev, self.retained)}, self.device))


def _scaled(weight: float | torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weight * value``; a per-image weight ``(B,)`` scales the rows of ``value``."""
    if isinstance(weight, torch.Tensor):
        return weight.reshape(-1, *([1] * (value.dim() - 1))) * value
    return weight * value


@torch.no_grad()
def frozen_outputs(models: FrozenModels, x: torch.Tensor, device: torch.device,
                   chunk: int = 1024, relevance: dict[str, torch.Tensor] | None = None,
                   rows: torch.Tensor | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Teacher and previous-model outputs on ``x`` (float32, in chunks of ``chunk`` images).

    ``rows`` are the pool indices of ``x``'s images, which teachers given as pool outputs
    need (:meth:`FrozenModels.teacher_outputs`); ``None`` when ``x`` is a random view.

    ``relevance`` holds, per domain with sample weights, its teachers' normalised weights on
    the images of ``x`` (``(T, len(x))``, :meth:`FrozenModels.relevance`'s rows); those
    domains' teachers are mixed per image (:func:`strategies.distill.domain_relevance`).

    Returns
    -------
    dict
        ``probs`` (tempered), ``conf``, ``feats`` and ``logits`` per taught domain, each the
        weighted mean over the domain's teachers; ``relevance`` (``rho``, ``(len(x),)``) per
        domain of ``relevance``; ``previous`` (tempered probabilities) and ``prev_logits``
        per retained domain.
    """
    t = models.temperature
    probs, conf, feats, logits, rho = {}, {}, {}, {}, {}
    for domain in models.groups:
        task = models.tasks[domain]
        p_sum = c_sum = f_sum = l_sum = 0.0
        mix = None
        if relevance and domain in relevance:
            base = torch.tensor([w for w, _ in models.groups[domain]])
            mix, rho[domain] = domain_relevance(base, relevance[domain].to(device).float())
        for i, (w_i, lg, ft) in enumerate(models.teacher_outputs(domain, x, rows, chunk)):
            w = w_i if mix is None else mix[i]
            p_sum = p_sum + _scaled(w, tempered_probs(lg, t, task))
            c_sum = c_sum + _scaled(w, confidence(lg, task))
            f_sum = f_sum + _scaled(w, ft)
            l_sum = l_sum + _scaled(w, lg)
        probs[domain], conf[domain], feats[domain], logits[domain] = p_sum, c_sum, f_sum, l_sum
    previous: dict[str, torch.Tensor] = {}
    prev_logits: dict[str, torch.Tensor] = {}
    net = models.previous()
    if net is not None:
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for i in range(0, len(x), chunk):
            f = net.features(x[i:i + chunk].to(device))
            for d in models.retained:
                parts[d].append(net.heads[d](f).float())
        for d in models.retained:
            prev_logits[d] = torch.cat(parts[d])
            previous[d] = tempered_probs(prev_logits[d], t, models.tasks[d])
    return {"probs": probs, "conf": conf, "feats": feats, "logits": logits,
            "relevance": rho, "previous": previous, "prev_logits": prev_logits}


def _targets(request: DistillRequest, model_cfg: ModelConfig, x: torch.Tensor,
             device: torch.device) -> dict[str, Any]:
    """Teacher and previous-model outputs on ``x``, computed once (they never change)."""
    return frozen_outputs(FrozenModels(request, model_cfg, device), x, device)


def random_view(x: torch.Tensor, rng: np.random.Generator, shift: int = 2) -> torch.Tensor:
    """A random view of every image of ``x`` ``(B, C, H, W)``: a horizontal flip with
    probability 1/2, then a translation by up to ``shift`` pixels along each axis (edge
    pixels repeated into the gap), each drawn per image from ``rng``."""
    b, _, h, w = x.shape
    flip = torch.from_numpy(rng.random(b) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift <= 0:
        return x
    dy, dx = (torch.from_numpy(v).to(x.device) for v in rng.integers(-shift, shift + 1, (2, b)))
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    rows = torch.arange(h, device=x.device)[None, :] + shift - dy[:, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + shift - dx[:, None]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices split by the channel slice: the result is (B, H, W, C)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def mixup_draw(n: int, rng: np.random.Generator, alpha: float) -> tuple[float, torch.Tensor]:
    """One batch's mixup: ``lambda ~ Beta(alpha, alpha)``, then a permutation of ``n``."""
    lam = float(rng.beta(alpha, alpha))
    return lam, torch.from_numpy(rng.permutation(n))


def mixup(x: torch.Tensor, rng: np.random.Generator, alpha: float) -> torch.Tensor:
    """``lambda * x + (1 - lambda) * x[perm]``: every image mixed with another image of the
    batch (a random permutation), one ``lambda ~ Beta(alpha, alpha)`` per batch."""
    lam, perm = mixup_draw(len(x), rng, alpha)
    perm = perm.to(x.device)
    return lam * x + (1.0 - lam) * x[perm]


def pool_view(x: torch.Tensor, rng: np.random.Generator, settings: DistillSettings
              ) -> torch.Tensor:
    """The batch the student and the frozen networks see (function matching): ``x`` through
    :func:`random_view` when ``distill.augment``, then :func:`mixup` when
    ``distill.mixup_alpha > 0``; ``x`` itself when both are off."""
    return weighted_pool_view(x, rng, settings, None)[0]


def weighted_pool_view(x: torch.Tensor, rng: np.random.Generator, settings: DistillSettings,
                       relevance: dict[str, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """:func:`pool_view` of ``x`` (the same draws) with its images' teacher weights:
    ``relevance`` (domain -> ``(T, B)``, or ``None``) is kept by a random view and mixed
    with the images under mixup (``lambda * r + (1 - lambda) * r[:, perm]``)."""
    if settings.augment:
        x = random_view(x, rng)
    if settings.mixup_alpha > 0:
        lam, perm = mixup_draw(len(x), rng, settings.mixup_alpha)
        x = lam * x + (1.0 - lam) * x[perm.to(x.device)]
        if relevance is not None:
            relevance = {d: lam * r + (1.0 - lam) * r[:, perm.to(r.device)]
                         for d, r in relevance.items()}
    return x, relevance


def _rows(targets: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The same targets for a slice of the images they were computed on."""
    return {name: {d: v[rows] for d, v in by_domain.items()}
            for name, by_domain in targets.items()}


def untrained_heads(request: DistillRequest) -> list[str]:
    """The heads of ``request`` that nothing trained: no head in the student's start (the
    previous global model) and no teacher of that domain this round."""
    taught = {t.domain for t in request.teachers}
    return sorted(d for d in request.heads
                  if d not in taught and not head_of(request.student, d))


def check_heads(request: DistillRequest) -> None:
    """Raise :class:`DistillError` (a ``ValueError``) naming every head nobody trained (see
    :func:`untrained_heads`): it would be exported and evaluated as if real while it is a
    random initialisation."""
    missing = untrained_heads(request)
    if missing:
        where = f" {request.tag}" if request.tag else ""
        raise DistillError(f"distillation{where}: head(s) {missing} have no previous global "
                           "head and no teacher this round (did every client of those domains "
                           "fail?); a head nobody trained is never exported")


def check_finite(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``state`` itself, or :class:`DistillError` naming its NaN / Inf tensors (``what``:
    the state, in the message)."""
    bad = nonfinite_keys(state)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise DistillError(f"{what} has non-finite (NaN or Inf) tensors: {shown}; "
                           "lower distill.lr or check the teachers")
    return state


@dataclass(frozen=True)
class MAEPart:
    """What the MAE term needs besides the student: the base's settings (decoder sizes,
    mask ratio) and its decoder's weights (:func:`engine.train.mim.mae_decoder_state`)."""

    pretrain: PretrainConfig
    decoder: dict[str, torch.Tensor]


def attach_mae(student: Student, part: MAEPart, model_cfg: ModelConfig,
               precision: str) -> Student:
    """``student`` with the MIM base's MAE tied to its encoder and the base's decoder
    loaded (the encoder keeps the student's own weights).

    Raises
    ------
    DistillError
        When the decoder does not fit the MAE these settings build.
    """
    mae = tie_mae(build_mae(model_cfg, part.pretrain), student.net.encoder)
    own = {k for k in mae.state_dict() if not k.startswith(("patch_embedding.", "blocks."))}
    if set(part.decoder) != own:
        raise DistillError(f"distill.mae_weight: the MIM base's decoder does not fit the MAE "
                           f"of pretrain.* (missing {sorted(own - set(part.decoder))[:3]}, "
                           f"extra {sorted(set(part.decoder) - own)[:3]})")
    mae.load_state_dict(part.decoder, strict=False)
    student.mae, student.patch_size, student.precision = mae, model_cfg.patch_size, precision
    return student


def _student(request: DistillRequest, model_cfg: ModelConfig, taught: list[str]) -> Student:
    check_heads(request)
    heads = {d: n for d, (_, n) in request.heads.items()}
    net = build_model(model_cfg, heads)
    own = net.state_dict()
    init = {k: v for k, v in request.student.items() if k in own}
    for domain in heads:  # a new head starts as the mean of its teachers' heads
        if head_of(init, domain):
            continue
        teachers = [t for t in request.teachers if t.domain == domain]
        for key in head_of(own, domain):
            # (teachers given as pool outputs, or of another encoder family, have no head of
            # the student's shape: with none such, the head keeps its random initialisation)
            fit = [t.state[key].float() for t in teachers
                   if key in t.state and t.state[key].shape == own[key].shape]
            if fit:
                init[key] = torch.stack(fit).mean(0)
    missing = [k for k in own if k not in init and not is_head_key(k)]
    if missing:
        raise ValueError(f"student state lacks encoder tensors {missing[:3]}")
    net.load_state_dict(init, strict=False)
    return Student(net, taught, widths=teacher_widths(request))


def teacher_widths(request: DistillRequest) -> dict[str, int]:
    """Per taught domain, the width of its teachers' features (the feature-matching
    targets): the pool outputs' columns, else the input width of the domain's head."""
    widths: dict[str, int] = {}
    for t in request.teachers:
        if t.outputs is not None:
            width = int(t.outputs.features.shape[1])
        else:
            weight = [v for k, v in head_of(t.state, t.domain).items() if v.ndim == 2]
            if not weight:
                continue
            width = int(weight[0].shape[1])
        if widths.setdefault(t.domain, width) != width:
            raise DistillError(f"the teachers of {t.domain} have features of widths "
                               f"{widths[t.domain]} and {width}: one encoder family per domain")
    return widths


class DistillJob:
    """One worker's distillation in plain torch: its slice of the pool, the frozen teacher
    and previous-model outputs (or, with function matching on, the frozen networks, run per
    batch on its view), the student and the optimiser.

    Ray Train runs it through :func:`distill_loop`; the benchmark runs it in-process.

    Parameters
    ----------
    request
        Teachers, student start, settings.
    model_cfg
        Network settings.
    x
        The whole (normalised) pool; a held-out slice is kept for the stopping signal and
        the rest is sharded over ``world`` workers. The teachers' ``sample_weights``, if
        any, index its images (:class:`DistillError` when their length is not ``len(x)``).
    device
        Where the job computes.
    rank, world
        This worker and the number of workers.
    wrap
        Wraps the student for data parallelism (Ray Train's ``prepare_model``).
    precision
        ``train.precision`` of the experiment: the student's forward pass in training
        (:func:`engine.nn.precision.autocast_dtype`).
    mae
        The MIM base's settings and decoder, for the MAE term (``distill.mae_weight > 0``;
        :class:`DistillError` when the weight is set and this is ``None``).
    """

    def __init__(self, request: DistillRequest, model_cfg: ModelConfig, x: torch.Tensor,
                 device: torch.device, *, rank: int = 0, world: int = 1,
                 wrap: Callable[[nn.Module], nn.Module] | None = None,
                 precision: str = "auto", mae: MAEPart | None = None) -> None:
        s = self.settings = request.settings
        torch.manual_seed(request.seed + rank)
        order = np.random.default_rng(request.seed).permutation(len(x))
        n_hold = max(1, round(s.holdout_fraction * len(x)))
        # the held-out slice, then this worker's share of the rest: one copy, two views
        rows = np.concatenate([order[:n_hold], order[n_hold:][rank::world]])
        both = x[rows]
        self.x_hold, self.x_train = both[:n_hold], both[n_hold:]
        self.device = device
        self.taught = sorted({t.domain for t in request.teachers})
        self.tasks = {d: task for d, (task, _) in request.heads.items()}
        # every frozen teacher is built once (in the same order either way)
        frozen = FrozenModels(request, model_cfg, device, keep=s.per_batch_targets)
        frozen.pool_size = len(x)
        if s.per_batch_targets and any(t.outputs is not None for t in request.teachers):
            raise DistillError("distill.augment / distill.mixup_alpha need the teachers on "
                               "each batch's random view; teachers given as pool outputs "
                               "(privacy.transfer=predictions) cover the plain images only")
        # per-sample relevance: every teacher's normalised weights of this job's images
        # (held-out first, then this worker's share), or None (the default)
        pool_rel = frozen.relevance(len(x))
        rows_t = torch.from_numpy(rows)
        rel = {d: r[:, rows_t] for d, r in pool_rel.items()} or None
        self.frozen: FrozenModels | None = None
        self.train_t: dict[str, Any] | None = None
        self.weights: torch.Tensor | None = None
        self.view_rng: np.random.Generator | None = None
        self.train_rel: dict[str, torch.Tensor] | None = None
        if s.per_batch_targets:
            # function matching: the teachers see each batch's own view, so they are kept
            # and run per batch; the held-out signal is on the plain images
            self.frozen = frozen
            if rel is None:
                self.hold_t = frozen_outputs(frozen, self.x_hold, device)
            else:
                self.hold_t = frozen_outputs(frozen, self.x_hold, device,
                                             relevance={d: r[:, :n_hold] for d, r in rel.items()})
                self.train_rel = {d: r[:, n_hold:] for d, r in rel.items()}
            self.view_rng = np.random.default_rng([request.seed, rank, 0x5EED])
        else:
            # the teachers are run over both slices once, in one pass
            targets = (frozen_outputs(frozen, both, device, rows=rows_t) if rel is None
                       else frozen_outputs(frozen, both, device, relevance=rel, rows=rows_t))
            self.hold_t = _rows(targets, slice(0, n_hold))
            self.train_t = _rows(targets, slice(n_hold, None))
            # (D, N): fixed per pool image, since the teachers' confidences never change
            self.weights = teacher_weights(torch.stack([self.train_t["conf"][d]
                                                        for d in self.taught]), s.weighting)
        del frozen
        self.retained = sorted(self.hold_t["previous"])
        student = _student(request, model_cfg, self.taught)
        self.reconstruct = s.mae_weight > 0
        if self.reconstruct:
            if mae is None:
                raise DistillError("distill.mae_weight > 0 needs the MIM base's decoder "
                                   "(pretrain.method=mim); none was given to the trainer")
            student = attach_mae(student, mae, model_cfg, precision)
        student = student.to(device)
        self.module = wrap(student) if wrap is not None else student
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=s.lr,
                                           weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=s.steps)
        self.generator = torch.Generator().manual_seed(request.seed + 1000 * rank)
        self.precision = precision
        self.use_bf16 = autocast_dtype(precision, device) == torch.bfloat16
        self.scaler = grad_scaler(precision, device)  # fp16 only (CUDA); None otherwise

    def step(self) -> dict[str, float]:
        """One optimiser step on a random batch; returns every named loss value
        (:data:`~strategies.distill.LOSS_NAMES`)."""
        s = self.settings
        idx = torch.randint(len(self.x_train), (min(s.batch_size, len(self.x_train)),),
                            generator=self.generator)
        xb = self.x_train[idx].to(self.device)
        if self.frozen is not None:  # this batch's view, to the teachers and the student
            assert self.view_rng is not None
            if self.train_rel is None:
                xb = pool_view(xb, self.view_rng, s)
                t = frozen_outputs(self.frozen, xb, self.device)
            else:  # the view's images carry their teachers' weights
                xb, rel = weighted_pool_view(xb, self.view_rng, s,
                                             {d: r[:, idx] for d, r in self.train_rel.items()})
                t = frozen_outputs(self.frozen, xb, self.device, relevance=rel)
            weights = teacher_weights(torch.stack([t["conf"][d] for d in self.taught]),
                                      s.weighting)
        else:  # the precomputed outputs of these pool images
            assert self.train_t is not None and self.weights is not None
            idx_d = idx.to(self.device)
            t = {name: {d: v[idx_d] for d, v in self.train_t[name].items()}
                 for name in ("probs", "feats", "relevance", "previous")}
            weights = self.weights[:, idx_d]
        with autocast(self.precision, self.device):
            _, logits, projected, rec = self.module(xb, reconstruct=self.reconstruct)
        terms = distillation_loss(
            logits, projected,
            teacher_probs={d: t["probs"][d] for d in self.taught},
            teacher_features={d: t["feats"][d] for d in self.taught},
            previous_probs={d: t["previous"][d] for d in self.retained},
            weights=weights, tasks=self.tasks, settings=s,
            sample_weights=t["relevance"] or None, mae=rec)
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_step(terms["loss"], self.optimizer, self.scaler)
        self.scheduler.step()
        return {name: float(value.detach()) for name, value in terms.items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Student/teacher (and student/previous-model) agreement on the held-out slice."""
        net = unwrap(self.module)
        net.eval()
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for i in range(0, len(self.x_hold), 1024):
            _, logits, _, _ = net(self.x_hold[i:i + 1024].to(self.device))
            for d, v in logits.items():
                out[d].append(v.float())
        logits = {d: torch.cat(v) for d, v in out.items()}
        scores = {f"agreement_{d}": float(agreement(logits[d], self.hold_t["logits"][d],
                                                    self.tasks[d])) for d in self.taught}
        scores |= {f"retention_{d}": float(agreement(logits[d], self.hold_t["prev_logits"][d],
                                                     self.tasks[d])) for d in self.retained}
        net.train()
        return {"agreement": float(np.mean(list(scores.values()))), **scores}

    def student_state(self) -> dict[str, torch.Tensor]:
        """The global model's weights (the student without its projections), on CPU."""
        return {k: v.detach().cpu().clone() for k, v in unwrap(self.module).net.state_dict()
                .items()}

    def run(self, on_eval: Callable[[dict[str, float], bool, dict[str, torch.Tensor] | None],
                                    None] | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` or until agreement stops improving for ``patience``
        evaluations. After every evaluation ``on_eval(row, stop, payload)`` gets the curve
        row and, when the student improved or training stops, the best student so far
        with the curve (key ``_curve``); returns the curve."""
        s = self.settings
        best, since_best = -1.0, 0
        losses: list[dict[str, float]] = []
        best_state: dict[str, torch.Tensor] | None = None
        curve: list[dict[str, float]] = []
        started = time.perf_counter()
        for step in range(1, s.steps + 1):
            losses.append(self.step())
            if step % s.eval_every and step != s.steps:
                continue
            scores = self.evaluate()
            means = {name: float(np.mean([row[name] for row in losses])) for name in LOSS_NAMES}
            losses = []
            improved = scores["agreement"] > best
            if improved:
                best, since_best, best_state = scores["agreement"], 0, self.student_state()
            else:
                since_best += 1
            stop = since_best >= s.patience or step == s.steps
            row = {"step": float(step), **means,
                   "best_agreement": best, "elapsed_s": time.perf_counter() - started,
                   **scores}
            curve.append(row)
            payload = None
            if (improved or stop) and best_state is not None:
                payload = {**best_state, CURVE_KEY: torch.tensor(
                    [[r.get(k, float("nan")) for k in CURVE_FIELDS] for r in curve])}
            if on_eval is not None:
                on_eval(row, stop, payload)
            if stop:
                break
        return curve


def distill_loop(config: dict[str, Any]) -> None:
    """Per-worker distillation on Ray Train (DDP when there are several workers).

    Every evaluation is reported; the checkpoint always holds the best student so far and
    the curve up to now, so the latest checkpoint is the one to keep.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    kwargs = {"find_unused_parameters": True} if world > 1 else None
    job = DistillJob(config["request"], config["model"], load_pool(config["data"]),
                     ray.train.torch.get_device(), rank=ctx.get_world_rank(), world=world,
                     wrap=lambda m: ray.train.torch.prepare_model(
                         m, parallel_strategy_kwargs=kwargs),
                     precision=str(config.get("precision", "auto")),
                     mae=config.get("mae"))
    job.run(lambda row, stop, payload: report({**row, "stopped": float(stop)}, payload))


class RayTrainDistiller(DistillService):
    """The engine's :class:`~strategies.distill.DistillService`: a ``TorchTrainer`` per call.

    Parameters
    ----------
    model
        Network settings of teachers and student.
    data
        Data settings: the server's unlabelled pool (and its optional subsample).
    storage_path
        Where Ray Train writes the checkpoints (``<run dir>/train``).
    scaling
        How each job is spread over Train workers (``distill.num_workers`` ...).
    callbacks
        Makes the Ray Train callbacks of each request (e.g. Tune's ``TuneReportCallback``,
        so a Tune scheduler sees the distillation's intermediate results).
    precision
        The experiment's ``train.precision`` (:mod:`engine.nn.precision`).
    mae
        The MIM base's settings and decoder for the MAE term (``distill.mae_weight``).
    """

    def __init__(self, model: ModelConfig, data: DataConfig, storage_path: str, *,
                 scaling: TrainScaling | None = None,
                 callbacks: Callable[[DistillRequest], list[Any]] | None = None,
                 precision: str = "auto", mae: MAEPart | None = None) -> None:
        check_precision(precision)  # a bad name fails here, not in a Train worker
        self.model = model
        self.data = data
        self.storage_path = storage_path
        self.scaling = scaling or TrainScaling()
        self.callbacks = callbacks
        self.precision = precision
        self.mae = mae

    def distil(self, request: DistillRequest) -> DistillResult:
        """Distil ``request`` on a ``TorchTrainer``; the student must come back finite.

        Raises
        ------
        ValueError
            No teacher.
        DistillError
            A head that nobody trained (:func:`check_heads`), a distilled student with NaN
            or Inf tensors (:func:`check_finite`), or no student reported at all.
        """
        s = self.scaling
        if not request.teachers:
            raise ValueError("distillation needs at least one teacher")
        check_heads(request)
        result = fit_trainer(distill_loop, {"request": request, "model": self.model,
                                            "data": self.data, "precision": self.precision,
                                            "mae": self.mae},
                             num_workers=s.num_workers, use_gpu=s.use_gpu,
                             storage_path=self.storage_path, name=request.tag,
                             knob="distill",
                             callbacks=self.callbacks(request) if self.callbacks else None,
                             cpus_per_worker=s.cpus_per_worker,
                             gpus_per_worker=s.gpus_per_worker,
                             steps=request.settings.steps)
        if result.checkpoint is None:
            raise DistillError(f"distillation {request.tag}: the job reported no student (its "
                               "agreement was never a number: a non-finite student?)")
        state = load_checkpoint_state(result.checkpoint)
        table = state.pop(CURVE_KEY)
        check_finite(state, f"the student distilled by {request.tag}")
        curve = [dict(zip(CURVE_FIELDS, map(float, row), strict=True)) for row in table.tolist()]
        final = curve[-1]
        metrics = {"distill_steps": final["step"], "distill_agreement": final["best_agreement"],
                   "distill_loss": final["loss"]}
        return DistillResult(state=state, metrics=metrics, curve=curve)
