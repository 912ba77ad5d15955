"""Several virtual clients of one actor trained in one fused step (``clients.fused_clients``).

A client actor that serves many small clients (the cross-device case) gets its whole share of
a round in one task (``clients.dispatch: actor``). Clients whose fits are alike (the same
network, one domain, plain local training) are then trained together by
:func:`engine.nn.fused.fused_train`: stacked parameters under ``torch.func.vmap``, the same
arithmetic as :meth:`engine.fl.client.Client.fit` per client to float rounding (tested). A
fit the fused path cannot express (its own encoder family, epoch selection on val, pool
scores or outputs, DP-SGD, a learning-rate schedule, fp16, a client of several domains, a
network with BatchNorm or dropout) is trained alone as before, and its result says so
(metric ``fused`` = 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from engine.fl.client import Client, derive_seed, seed_torch
from engine.nn.augment import BatchAugment
from engine.nn.fused import OPTIMIZERS, ClientBatches, check_fusable, fused_train
from engine.nn.precision import autocast_dtype
from strategies.types import FitIns, FitRes

logger = logging.getLogger(__name__)

UNFUSABLE_KEYS = ("arch", "select_on_val", "score_pool", "pool_outputs", "keep_teacher")
"""Fit-config keys whose fit the fused path cannot train (when set and true; any ``dp_*``
key, a DP-SGD plan, too)."""


def unfusable(client: Client, ins: FitIns) -> str | None:
    """Why ``client``'s fit ``ins`` cannot join a fused step (``None``: it can)."""
    for key in UNFUSABLE_KEYS:
        if ins.config.get(key):
            return f"fit config {key}"
    if any(k.startswith("dp_") for k in ins.config):
        return "DP-SGD"
    if len(client.data) != 1:
        return "a client of several domains"
    tc = client.train_cfg
    if tc.schedule != "constant" or tc.warmup_epochs:
        return f"train.schedule={tc.schedule} (warm-up {tc.warmup_epochs} epochs)"
    if tc.optimizer not in OPTIMIZERS:
        return f"train.optimizer={tc.optimizer}"
    if autocast_dtype(tc.precision, client.device) == torch.float16:
        return "train.precision=fp16"
    try:
        check_fusable(client.model)
    except ValueError as err:
        return str(err)
    return None


def _group_key(client: Client, ins: FitIns) -> tuple:
    """Fits that can share one fused step: same network, domain, task and options."""
    (domain,) = client.data
    return (id(client.model), domain, client.tasks[domain],
            float(ins.config.get("lr", client.train_cfg.lr)),
            float(ins.config.get("proximal_mu", 0.0)))


def fit_fused(clients: Sequence[Client], work: Sequence[FitIns], *, chunk: int
              ) -> list[FitRes]:
    """Train ``clients[i]`` on ``work[i]`` for every ``i``, ``chunk`` clients per fused step.

    Every fit must be fusable (:func:`unfusable`) and the clients must share one network;
    the results equal :meth:`Client.fit`'s (float rounding), with metrics ``train_loss``
    (the last epoch's mean, as ``Client.fit``), ``train_seconds`` (the step's wall time
    shared evenly) and ``fused`` = 1.
    """
    # clients of alike step counts share a step, so little of it is padding
    order = sorted(range(len(clients)), key=lambda i: (_steps(clients[i], work[i]), i))
    out: list[FitRes | None] = [None] * len(clients)
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        for i, res in zip(part, _fit_chunk([clients[i] for i in part],
                                           [work[i] for i in part]), strict=True):
            out[i] = res
    return [res for res in out if res is not None]


def _steps(client: Client, ins: FitIns) -> int:
    """Optimisation steps of a fit (epochs x batches)."""
    size = client.train_cfg.batch_size
    epochs = int(ins.config.get("epochs", client.train_cfg.local_epochs))
    return epochs * sum(-(-len(d["train"].y) // size) for d in client.data.values())


def _fit_chunk(clients: Sequence[Client], work: Sequence[FitIns]) -> list[FitRes]:
    started = time.perf_counter()
    first = clients[0]
    (domain,) = first.data
    tc = first.train_cfg
    starts, batches, last_epoch = [], [], []
    for client, ins in zip(clients, work, strict=True):
        cfg = ins.config
        seed = int(cfg.get("seed", client.seed))
        fit_seed = derive_seed(seed, int(cfg.get("round", 0)), client.cid)
        seed_torch(fit_seed)
        generator = torch.Generator().manual_seed(fit_seed)
        client._load(ins.state, ins.fresh_heads, seed)  # the start, fresh heads included
        starts.append({k: v.detach().clone() for k, v in client._tensors().items()})
        epochs = int(cfg.get("epochs", tc.local_epochs))
        steps: list[torch.Tensor] = []
        per_epoch = 0
        for _ in range(epochs):
            epoch = [idx for _, idx in client._batches(generator)]
            steps += epoch
            per_epoch = len(epoch)
        split = client.data[domain]["train"]
        augment = (BatchAugment(tc.augment, derive_seed(fit_seed, "augment"))
                   if tc.augment else None)
        batches.append(ClientBatches(split.x, split.y,
                                     [idx.to(client.device) for idx in steps], augment))
        last_epoch.append(per_epoch)
    ins0 = work[0]
    result = fused_train(
        first.model, domain, starts, batches,
        lr=float(ins0.config.get("lr", tc.lr)), optimizer=tc.optimizer,
        momentum=tc.momentum if tc.optimizer == "sgd" else 0.0,
        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
        proximal_mu=float(ins0.config.get("proximal_mu", 0.0)),
        task=first.tasks[domain], precision=tc.precision)
    seconds = (time.perf_counter() - started) / len(clients)
    return [FitRes(cid=client.cid, state=state, num_examples=client.info().num_train,
                   metrics={"train_loss": result.train_loss(i, last=last_epoch[i]),
                            "train_seconds": seconds, "fused": 1.0})
            for i, (client, state) in enumerate(zip(clients, result.states, strict=True))]


def plan_fused(clients: Sequence[Client], work: Sequence[FitIns]
               ) -> tuple[list[list[int]], list[tuple[int, str]]]:
    """Split the indices of ``work`` into fusable groups (alike fits, in order) and the rest
    with the reason each cannot be fused."""
    groups: dict[tuple, list[int]] = {}
    alone: list[tuple[int, str]] = []
    for i, (client, ins) in enumerate(zip(clients, work, strict=True)):
        why = unfusable(client, ins)
        if why is None:
            groups.setdefault(_group_key(client, ins), []).append(i)
        else:
            alone.append((i, why))
    return list(groups.values()), alone
