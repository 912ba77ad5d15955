"""Several clients' local training in one fused step: stacked parameters and ``torch.func``.

In the cross-device case (many clients of a few dozen images, a small network, one local
epoch) every client update pays fixed costs (loading the model, building the optimiser,
per-step dispatch, exporting the weights) on top of a few small batches. :func:`fused_train`
trains ``K`` clients' copies of one network **at once**: their parameters are stacked along
a new leading dimension, the forward and backward passes of all ``K`` run as one batched
computation (``torch.func.functional_call`` under ``vmap`` of ``grad``; a convolution
becomes one grouped convolution, a linear layer one batched matmul), and the optimiser
updates the stacked tensors in place.

The result equals ``K`` independent runs of the engine's local training
(``engine.fl.client.Client._train_epoch``: ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` over
each client's index batches, the loss of ``Client._loss``) to float rounding:

* clients may have different numbers of batches and a smaller last batch: each step's
  batches are padded to that step's largest with a sample mask (the loss is the mean over
  the real samples), and an exhausted client's steps are padded too, with an ``active``
  mask under which its parameters and optimiser state do not change (its gradients are
  zero and its step's factors make the update an exact identity: no weight decay, no
  momentum decay, no Adam step count on a padded step);
* parameters the forward of ``domain`` does not reach (other domains' heads, frozen ones)
  get no update, as ``torch.optim`` skips a parameter without a gradient (with FedProx
  every trainable encoder parameter gets one: its proximal term reaches them all);
* the per-step loss (with FedProx's proximal term, as the engine's metric has it) is kept,
  and :meth:`FusedResult.train_loss` averages it over samples as ``_train_epoch`` does.

Supported, and tested against per-client ``torch.optim`` runs (``tests/unit/nn/
test_fused.py``):

* optimisers ``sgd`` (momentum, dampening 0, Nesterov, L2 weight decay), ``adam`` (L2
  weight decay), ``adamw`` (decoupled weight decay), with ``betas`` / ``eps``; no AMSGrad,
  no other optimiser;
* a constant learning rate, or one rate per step per client (``step_lrs``): a
  ``train.schedule`` is ``lr * engine.nn.schedule.lr_factor(...)(t)`` at step ``t``;
* ``train.grad_clip`` (each client's global norm, as ``clip_grad_norm_``);
* FedProx's ``proximal_mu`` (the pull of the encoder towards the client's start);
* ``train.augment``: a per-client callable applied to each of its batches in order (the
  engine's :class:`~engine.nn.augment.BatchAugment` draws from its own seeded generator,
  so the batches equal the per-client ones; applying it costs a Python loop per step);
* ``train.precision`` ``fp32`` (and ``auto`` on a CPU); ``bf16`` autocast runs, equal to
  the per-client bf16 run only to bf16 rounding (the batched kernels round differently);
  ``fp16`` is refused (its loss scaler);
* tasks: multi-class and binary (cross-entropy on class indices), multi-label (binary
  cross-entropy);
* networks whose samples do not interact and that draw no random numbers:
  :func:`check_fusable` refuses BatchNorm and dropout with ``p > 0``; buffers are read,
  never written.

Not covered, so the engine must keep them on the per-client path: DP-SGD, clients of
several domains (one call trains one ``domain``), ``select_on_val`` (it scores every
epoch), ``score_pool`` / ``pool_outputs`` (they follow training, per client, unchanged),
and an encoder of the client's own family (``ClientInfo.arch``: another network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.nn.precision import autocast, autocast_dtype
from strategies.state import ENCODER_PREFIX

State = dict[str, torch.Tensor]
Optimizer = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")


@dataclass
class ClientBatches:
    """One client's work for :func:`fused_train`.

    Attributes
    ----------
    x
        Its train images ``(N, ...)`` (on the network's device).
    y
        Its labels: ``(N,)`` or ``(N, 1)`` class indices for multi-class and binary tasks,
        ``(N, C)`` 0/1 targets for multi-label ones.
    batches
        Index batches into ``x``, one per optimisation step, all epochs concatenated (in
        ``engine.fl.client.epoch_batches`` order); the last of an epoch may be smaller.
    augment
        Applied to each batch's images in order, before the forward pass (``None``: none).
    """

    x: torch.Tensor
    y: torch.Tensor
    batches: list[torch.Tensor]
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class FusedResult:
    """What :func:`fused_train` returns.

    Attributes
    ----------
    states
        Each client's trained state (every key of ``net.state_dict()``, CPU, contiguous
        float tensors of their own, as ``Client._export`` makes them).
    step_losses
        Per client, the loss of each of its steps ``(its number of batches,)`` float64
        (including FedProx's proximal term, as the engine's metric has it).
    step_sizes
        Per client, the number of samples of each of its steps.
    """

    states: list[State]
    step_losses: list[torch.Tensor] = field(default_factory=list)
    step_sizes: list[torch.Tensor] = field(default_factory=list)

    def train_loss(self, client: int, last: int | None = None) -> float:
        """The mean training loss over samples of ``client``'s last ``last`` steps (all of
        them by default; an epoch's batches for ``Client._train_epoch``'s metric)."""
        losses, sizes = self.step_losses[client], self.step_sizes[client]
        if last is not None:
            losses, sizes = losses[len(losses) - last:], sizes[len(sizes) - last:]
        return float((losses * sizes).sum() / max(float(sizes.sum()), 1.0))


def check_fusable(net: nn.Module) -> None:
    """Raise ``ValueError`` when ``net`` holds a layer the fused path cannot train exactly:
    batch normalisation (it couples the samples of a batch and writes running statistics)
    or dropout with ``p > 0`` (random per client)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            raise ValueError(f"fused training: {name} is a {type(module).__name__}; batch "
                             "statistics cannot be fused (use a network without BatchNorm)")
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ValueError(f"fused training: {name} is dropout with p={module.p}; random "
                             "layers cannot be fused (set model.dropout=0)")


def fused_train(net: nn.Module, domain: str, starts: Mapping[str, torch.Tensor]
                | Sequence[Mapping[str, torch.Tensor]], clients: Sequence[ClientBatches], *,
                lr: float, optimizer: Optimizer = "sgd", momentum: float = 0.0,
                nesterov: bool = False, weight_decay: float = 0.0,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                step_lrs: Sequence[Sequence[float]] | None = None,
                grad_clip: float | None = None, proximal_mu: float = 0.0,
                task: str = "multi-class", precision: str = "fp32") -> FusedResult:
    """Train ``len(clients)`` copies of ``net`` on their own batches in one fused loop.

    Parameters
    ----------
    net
        The network (``net(x, domain)`` gives logits); only its structure is used, its own
        tensors are not changed. See :func:`check_fusable`.
    domain
        The head every client trains (``net(x, domain)``).
    starts
        Each client's starting state (``net.state_dict()`` keys), or one state all start
        from.
    clients
        Each client's images, labels and batches (:class:`ClientBatches`).
    lr
        The learning rate (ignored where ``step_lrs`` gives one).
    optimizer
        ``sgd``, ``adam`` or ``adamw``, as ``torch.optim`` defines them.
    momentum, nesterov
        SGD's momentum (dampening 0) and Nesterov flag.
    weight_decay
        L2 penalty (``sgd``, ``adam``) or decoupled decay (``adamw``).
    betas, eps
        Adam's and AdamW's.
    step_lrs
        Per client, the learning rate of each of its steps (a schedule stepped per batch;
        ``None``: ``lr`` throughout).
    grad_clip
        Clip each client's global gradient norm to this (``None``: no clipping).
    proximal_mu
        FedProx: adds ``mu / 2 * ||w - w_start||^2`` over the encoder's parameters.
    task
        ``multi-label`` (binary cross-entropy) or any other task (cross-entropy), as
        ``Client._loss``.
    precision
        ``fp32`` / ``auto`` / ``bf16`` (:mod:`engine.nn.precision`); ``fp16`` is refused.

    Returns
    -------
    FusedResult
        The trained states and the per-step losses.

    Raises
    ------
    ValueError
        For an unsupported option or network, or inputs that do not fit each other.
    """
    options = _Options(optimizer, lr, momentum, nesterov, weight_decay, betas, eps,
                       grad_clip, proximal_mu)
    options.check()
    check_fusable(net)
    device = next(net.parameters()).device
    if autocast_dtype(precision, device) == torch.float16:
        raise ValueError("fused training: train.precision=fp16 (its loss scaler) is not "
                         "supported; use bf16 or fp32")
    k = len(clients)
    starts_list = [starts] * k if isinstance(starts, Mapping) else list(starts)
    if len(starts_list) != k:
        raise ValueError(f"fused training: {len(starts_list)} start states for {k} clients")
    if step_lrs is not None and (len(step_lrs) != k or any(
            len(r) != len(c.batches) for r, c in zip(step_lrs, clients, strict=True))):
        raise ValueError("fused training: step_lrs needs one rate per step of each client")
    keys = list(net.state_dict())
    for i, s in enumerate(starts_list):
        if set(s) != set(keys):
            missing, extra = sorted(set(keys) - set(s)), sorted(set(s) - set(keys))
            raise ValueError(f"fused training: start state {i} does not fit the network "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
    if k == 0:
        return FusedResult([])
    plan = _Plan.build(clients, task, device)
    trained = _trained_names(net, domain, starts_list[0], plan.probe(), device)
    if proximal_mu > 0:  # the proximal term reaches every trainable encoder parameter
        trained += [n for n, p in net.named_parameters() if p.requires_grad
                    and n.startswith(ENCODER_PREFIX) and n not in trained]
    if not trained:
        raise ValueError(f"fused training: no trainable parameter of the network is reached "
                         f"by the forward of domain {domain!r}")
    shared = isinstance(starts, Mapping)
    params = {n: _weights_layout(_stack(starts_list, n, device)) for n in trained}
    consts = {n: (starts_list[0][n].to(device) if shared else _stack(starts_list, n, device))
              for n in keys if n not in trained}
    anchors = ({n: params[n].clone() for n in params if n.startswith(ENCODER_PREFIX)}
               if proximal_mu > 0 else {})
    lrs = (torch.tensor([list(r) + [0.0] * (plan.steps - len(r)) for r in step_lrs],
                        dtype=torch.float64).T if step_lrs is not None else None)
    step_fn = _step_function(net, domain, options, plan.multilabel, precision, device,
                             const_batched=not shared, anchors=anchors)
    was_training = net.training
    net.train()
    try:
        losses = _run(step_fn, params, consts, anchors, plan, clients, options, lrs)
    finally:
        net.train(was_training)
    states = []
    for i in range(k):
        state = {}
        for n in keys:
            t = params[n][i] if n in params else (consts[n] if shared else consts[n][i])
            state[n] = t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        states.append(state)
    return FusedResult(states=states,
                       step_losses=[losses[:len(c.batches), i].clone()
                                    for i, c in enumerate(clients)],
                       step_sizes=[torch.tensor([float(len(b)) for b in c.batches],
                                                dtype=torch.float64) for c in clients])


@dataclass(frozen=True)
class _Options:
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float | None
    proximal_mu: float

    def check(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"fused training: optimizer must be one of {list(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("fused training: nesterov needs sgd with momentum > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"fused training: grad_clip must be > 0, got {self.grad_clip}")
        for name in ("lr", "momentum", "weight_decay", "eps", "proximal_mu"):
            if getattr(self, name) < 0:
                raise ValueError(f"fused training: {name} must be >= 0")


@dataclass
class _Plan:
    """Every step's padded batch of every client as indices into the clients' images
    concatenated: per step, ``index`` ``(K, B_t)`` and ``mask`` ``(K, B_t)`` (1: a real
    sample) on the device, ``B_t`` the step's largest batch, and ``active`` ``(T, K)`` on
    the CPU (the client has a step)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: list[torch.Tensor]
    mask: list[torch.Tensor]
    active: torch.Tensor
    multilabel: bool

    @property
    def steps(self) -> int:
        return len(self.index)

    @classmethod
    def build(cls, clients: Sequence[ClientBatches], task: str,
              device: torch.device) -> _Plan:
        multilabel = task == "multi-label"
        shape = clients[0].x.shape[1:]
        for i, c in enumerate(clients):
            if c.x.shape[1:] != shape or len(c.x) != len(c.y):
                raise ValueError(f"fused training: client {i}'s images {tuple(c.x.shape)} "
                                 f"and labels {tuple(c.y.shape)} do not fit client 0's "
                                 f"images {tuple(clients[0].x.shape)}")
        k = len(clients)
        steps = max(len(c.batches) for c in clients)
        offsets = torch.tensor([0] + [len(c.x) for c in clients]).cumsum(0).tolist()
        active = torch.zeros(steps, k, dtype=torch.bool)
        index, mask = [], []
        for t in range(steps):
            size = max([len(c.batches[t]) for c in clients if t < len(c.batches)] + [1])
            idx = torch.zeros(k, size, dtype=torch.long)
            real = torch.zeros(k, size)
            for i, c in enumerate(clients):
                if t < len(c.batches) and len(c.batches[t]):
                    b = c.batches[t]
                    idx[i, :len(b)] = b.to("cpu", torch.long) + offsets[i]
                    real[i, :len(b)] = 1.0
                    active[t, i] = True
            index.append(idx.to(device))
            mask.append(real.to(device))
        images = torch.cat([c.x.to(device) for c in clients])
        ys = [c.y.to(device).reshape(len(c.y), -1) for c in clients]
        labels = (torch.cat(ys).float() if multilabel else torch.cat(ys).reshape(-1).long())
        return cls(images, labels, index, mask, active, multilabel)

    def probe(self) -> torch.Tensor:
        """One image to find the parameters a forward pass reaches."""
        if len(self.images) == 0:
            raise ValueError("fused training: no client has any image")
        return self.images[:1]


def _stack(states: Sequence[Mapping[str, torch.Tensor]], name: str,
           device: torch.device) -> torch.Tensor:
    return torch.stack([s[name].to(device) for s in states]).contiguous()


_CHANNELS_LAST = True  # the layouts below (a measured choice; False: plain stacking)


def _images_layout(x: torch.Tensor) -> torch.Tensor:
    """A step's images ``(K, B, C, H, W)`` stored as ``(B, H, W, K, C)``: ``vmap`` folds
    ``K`` into the channels of one grouped convolution ``(B, K * C, H, W)``, and from this
    layout the fold is a channels-last view, the layout oneDNN runs grouped convolutions
    fastest in (their outputs keep it, so it carries through the layers). CPU only (where
    it was measured); elsewhere, and for other shapes, ``x`` is returned as it is."""
    if not _CHANNELS_LAST or x.dim() != 5 or x.device.type != "cpu":
        return x
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def _weights_layout(w: torch.Tensor) -> torch.Tensor:
    """Stacked convolution weights ``(K, O, C, kh, kw)`` stored as ``(K, O, kh, kw, C)``:
    their fold ``(K * O, C, kh, kw)`` is then a channels-last view (see
    :func:`_images_layout`). CPU only; other tensors are returned as they are."""
    if not _CHANNELS_LAST or w.dim() != 5 or w.device.type != "cpu":
        return w
    return w.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _trained_names(net: nn.Module, domain: str, start: Mapping[str, torch.Tensor],
                   probe: torch.Tensor, device: torch.device) -> list[str]:
    """The trainable parameters of ``net`` a forward of ``domain`` reaches (the ones
    ``torch.optim`` would step: those that get a gradient)."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    leaves = {n: start[n].detach().to(device).requires_grad_(True) for n in names}
    out = functional_call(net, leaves, (probe, domain), strict=False)
    grads = torch.autograd.grad(out.float().sum(), list(leaves.values()), allow_unused=True)
    return [n for n, g in zip(names, grads, strict=True) if g is not None]


def _step_function(net: nn.Module, domain: str, options: _Options, multilabel: bool,
                   precision: str, device: torch.device, *, const_batched: bool,
                   anchors: Mapping[str, torch.Tensor]
                   ) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(params, consts, anchors, x, y, mask) -> (grads, losses)`` over the ``K``
    stacked clients."""
    mu = options.proximal_mu

    def loss_fn(params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(precision, device):
            logits = functional_call(net, (params, consts), (x, domain))
        if multilabel:
            per = F.binary_cross_entropy_with_logits(logits.float(), y,
                                                     reduction="none").mean(dim=1)
        else:
            per = F.cross_entropy(logits.float(), y, reduction="none")
        loss = (per * mask).sum() / mask.sum().clamp(min=1.0)
        if mu > 0:
            prox = sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
            loss = loss + 0.5 * mu * prox
        return loss, loss.detach()

    in_dims = (0, 0 if const_batched else None, 0 if anchors else None, 0, 0, 0)
    return vmap(grad(loss_fn, has_aux=True), in_dims=in_dims)


def _run(step_fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
         params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
         anchors: dict[str, torch.Tensor], plan: _Plan, clients: Sequence[ClientBatches],
         options: _Options, lrs: torch.Tensor | None) -> torch.Tensor:
    """The fused loop: every step's gradients of all clients, then their optimiser
    updates, in place on the stacked tensors. Returns the losses ``(T, K)`` float64.

    An inactive client's gradients are exactly zero (its samples are all masked out), and
    its coefficients (:func:`_coefficients`) make every update an exact identity for it:
    a zero learning rate and weight decay, a momentum / beta factor of one."""
    k = len(clients)
    device = plan.images.device
    adam = options.optimizer != "sgd"
    moments = {n: torch.zeros_like(p) for n, p in params.items()
               if adam or options.momentum}
    squares = {n: torch.zeros_like(p) for n, p in params.items()} if adam else {}
    counts = torch.zeros(k, dtype=torch.float64)  # Adam's step counts, per client
    augmenting = any(c.augment is not None for c in clients)
    losses = torch.zeros(plan.steps, k, device=device, dtype=torch.float64)
    dtype = next(iter(params.values())).dtype
    for t in range(plan.steps):
        active = plan.active[t].to(torch.float64)
        x = _step_images(plan, clients, t) if augmenting else plan.images[plan.index[t]]
        x = _images_layout(x)
        y = plan.labels[plan.index[t]]
        grads, loss = step_fn(params, consts, anchors, x, y, plan.mask[t])
        losses[t] = loss.detach()
        counts += active
        lr = lrs[t] if lrs is not None else torch.full((k,), options.lr, dtype=torch.float64)
        coef = _coefficients(options, active, lr, counts).to(device, dtype)
        if options.grad_clip is not None:
            grads = _clip(grads, options.grad_clip)
        with torch.no_grad():
            for n, p in params.items():
                c = coef.view(coef.shape[:2] + (1,) * (p.dim() - 1))
                _update(options, p, grads[n], moments.get(n), squares.get(n), c)
    return losses.to("cpu", torch.float64)


def _coefficients(options: _Options, active: torch.Tensor, lr: torch.Tensor,
                  counts: torch.Tensor) -> torch.Tensor:
    """Per client, the step's factors ``(6, K)`` (float64, exact for an inactive client):
    learning rate, L2 or decoupled weight decay, momentum or beta1's weight, beta2, beta2's
    complement, Adam's step size; each zero (or one, for a factor) where inactive."""
    on, off = active, 1.0 - active
    wd = options.weight_decay
    if options.optimizer == "sgd":
        ones = torch.ones_like(on)
        return torch.stack([lr * on, wd * on, options.momentum * on + off, ones, ones, ones])
    beta1, beta2 = options.betas
    step = counts.clamp(min=1.0)
    bc2_sqrt = torch.sqrt(1 - beta2 ** step)
    decay = (1 - lr * wd * on) if options.optimizer == "adamw" else wd * on
    return torch.stack([lr * on / (1 - beta1 ** step), decay, (1 - beta1) * on,
                        beta2 * on + off, (1 - beta2) * on, bc2_sqrt])


def _step_images(plan: _Plan, clients: Sequence[ClientBatches], t: int) -> torch.Tensor:
    """Step ``t``'s padded images with each client's augmentation applied to its real
    samples (in the order of its batches, as its own loop would draw them)."""
    x = plan.images[plan.index[t]]
    for i, c in enumerate(clients):
        if c.augment is not None and t < len(c.batches) and len(c.batches[t]):
            n = len(c.batches[t])
            x[i, :n] = c.augment(c.x[c.batches[t].to(c.x.device)])
    return x


def _clip(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """``clip_grad_norm_`` per client: each client's gradients scaled by
    ``min(1, max_norm / (norm + 1e-6))`` of its global norm."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1)
                         for g in grads.values()])
    total = torch.linalg.vector_norm(norms, dim=0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return {n: g * coef.view((-1,) + (1,) * (g.dim() - 1)) for n, g in grads.items()}


def _update(options: _Options, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None,
            v: torch.Tensor | None, c: torch.Tensor) -> None:
    """One optimiser step, in place, of stacked parameter ``p`` with gradients ``g`` (the
    arithmetic of ``torch.optim``'s single-tensor SGD and Adam), ``m`` / ``v`` its moment
    buffers, ``c`` the per-client factors of :func:`_coefficients`."""
    lr, decay, w1, beta2, w2, bc2_sqrt = c
    if options.optimizer == "sgd":
        if options.weight_decay:
            g = g.addcmul(p, decay)
        if m is not None:
            m.mul_(w1).add_(g)
            g = g.add(m, alpha=options.momentum) if options.nesterov else m
        p.addcmul_(g, lr, value=-1.0)
        return
    assert m is not None and v is not None
    if options.weight_decay:
        if options.optimizer == "adamw":
            p.mul_(decay)
        else:
            g = g.addcmul(p, decay)
    m.lerp_(g, w1)
    v.mul_(beta2).addcmul_(g * g, w2)
    denom = (v.sqrt() / bc2_sqrt).add_(options.eps)
    p.addcmul_(m / denom, lr, value=-1.0)


__all__ = ["OPTIMIZERS", "ClientBatches", "FusedResult", "check_fusable", "fused_train"]
