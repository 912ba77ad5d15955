"""Multi-teacher distillation of client models into the global model, on Ray Train.

The trainer receives the teachers as weights (never client data), the student's starting
weights and the previous global model; it trains the student on the server's unlabelled
pool with the objective of :mod:`strategies.distill` (DDP over ``distill.num_workers``), and
stops on a label-free signal: student/teacher agreement on a held-out slice of the pool.
The best student so far is reported as a checkpoint after every evaluation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.config import DataConfig, ModelConfig
from engine.models import MultiHeadNet, build_model
from engine.pretrain import load_pool
from engine.trainjob import fit_trainer, load_checkpoint_state, report, unwrap
from strategies.aggregate import select
from strategies.distill import (
    DistillRequest,
    DistillResult,
    DistillService,
    agreement,
    confidence,
    feature_matching,
    kd_per_sample,
    teacher_weights,
    tempered_probs,
)

logger = logging.getLogger(__name__)

CURVE_KEY = "_curve"
CURVE_FIELDS = ("step", "loss", "kd", "feature", "retention", "agreement", "best_agreement")


class Student(nn.Module):
    """The global model plus one feature projection per taught domain (not exported)."""

    def __init__(self, net: MultiHeadNet, projected: list[str]) -> None:
        super().__init__()
        self.net = net
        width = net.out_features
        self.proj = nn.ModuleDict({d: nn.Linear(width, width) for d in projected})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                dict[str, torch.Tensor]]:
        features = self.net.features(x)
        logits = {d: head(features) for d, head in self.net.heads.items()}
        projected = {d: p(features) for d, p in self.proj.items()}
        return features, logits, projected


def _frozen(model_cfg: ModelConfig, heads: dict[str, int], state: dict[str, torch.Tensor],
            device: torch.device) -> MultiHeadNet:
    net = build_model(model_cfg, heads)
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net.to(device)


@torch.no_grad()
def _targets(request: DistillRequest, model_cfg: ModelConfig, x: torch.Tensor,
             device: torch.device) -> dict[str, Any]:
    """Teacher and previous-model outputs on ``x``, computed once (they never change)."""
    s = request.settings
    by_domain: dict[str, list] = defaultdict(list)
    for t in request.teachers:
        by_domain[t.domain].append(t)
    probs, conf, feats, logits = {}, {}, {}, {}
    for domain, teachers in sorted(by_domain.items()):
        task = teachers[0].task
        total = sum(t.weight for t in teachers)
        p_sum = c_sum = f_sum = l_sum = 0.0
        for t in teachers:
            state = {k: v for k, v in t.state.items()
                     if k.startswith("encoder.") or k.startswith(f"heads.{domain}.")}
            net = _frozen(model_cfg, {domain: t.num_classes}, state, device)
            out_l, out_f = [], []
            for i in range(0, len(x), 1024):
                f = net.features(x[i:i + 1024].to(device)).float()
                out_f.append(f)
                out_l.append(net.heads[domain](f))
            lg, ft = torch.cat(out_l), torch.cat(out_f)
            w = t.weight / total
            p_sum = p_sum + w * tempered_probs(lg, s.temperature, task)
            c_sum = c_sum + w * confidence(lg, task)
            f_sum = f_sum + w * ft
            l_sum = l_sum + w * lg
        probs[domain], conf[domain], feats[domain], logits[domain] = p_sum, c_sum, f_sum, l_sum
    previous: dict[str, torch.Tensor] = {}
    prev_logits: dict[str, torch.Tensor] = {}
    retained = [d for d in request.heads if d not in by_domain
                and select(request.previous, f"heads.{d}.")]
    if retained and s.gamma > 0:
        heads = {d: request.heads[d][1] for d in retained}
        state = {k: v for k, v in request.previous.items() if k.startswith("encoder.")
                 or any(k.startswith(f"heads.{d}.") for d in retained)}
        net = _frozen(model_cfg, heads, state, device)
        for d in retained:
            out = torch.cat([net(x[i:i + 1024].to(device), d).float()
                             for i in range(0, len(x), 1024)])
            prev_logits[d] = out
            previous[d] = tempered_probs(out, s.temperature, request.heads[d][0])
    return {"probs": probs, "conf": conf, "feats": feats, "logits": logits,
            "previous": previous, "prev_logits": prev_logits}


def _student(request: DistillRequest, model_cfg: ModelConfig, taught: list[str]) -> Student:
    heads = {d: n for d, (_, n) in request.heads.items()}
    net = build_model(model_cfg, heads)
    own = net.state_dict()
    init = {k: v for k, v in request.student.items() if k in own}
    for domain in heads:  # a new head starts as the mean of its teachers' heads
        if not select(init, f"heads.{domain}."):
            teachers = [t for t in request.teachers if t.domain == domain]
            for key in select(own, f"heads.{domain}."):
                if teachers:
                    init[key] = torch.stack([t.state[key].float() for t in teachers]).mean(0)
    missing = [k for k in own if k not in init and not k.startswith("heads.")]
    if missing:
        raise ValueError(f"student state lacks encoder tensors {missing[:3]}")
    net.load_state_dict(init, strict=False)
    return Student(net, taught)


def distill_loop(config: dict[str, Any]) -> None:
    """Per-worker distillation (Ray Train)."""
    import ray.train
    import ray.train.torch

    request: DistillRequest = config["request"]
    model_cfg: ModelConfig = config["model"]
    s = request.settings
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(request.seed + rank)

    x = load_pool(config["data"])
    order = np.random.default_rng(request.seed).permutation(len(x))
    n_hold = max(1, round(s.holdout_fraction * len(x)))
    hold_idx, train_idx = order[:n_hold], order[n_hold:][rank::world]
    x_hold, x_train = x[hold_idx], x[train_idx]
    taught = sorted({t.domain for t in request.teachers})
    tasks = {d: task for d, (task, _) in request.heads.items()}
    train_t = _targets(request, model_cfg, x_train, device)
    hold_t = _targets(request, model_cfg, x_hold, device)
    retained = sorted(train_t["previous"])

    student = _student(request, model_cfg, taught).to(device)
    module = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={
        "find_unused_parameters": True} if world > 1 else None)
    optimizer = torch.optim.AdamW(module.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.steps)
    generator = torch.Generator().manual_seed(request.seed + 1000 * rank)
    use_bf16 = device.type == "cuda"

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        module.eval()
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for i in range(0, len(x_hold), 1024):
            _, logits, _ = unwrap(module)(x_hold[i:i + 1024].to(device))
            for d, v in logits.items():
                out[d].append(v.float())
        logits = {d: torch.cat(v) for d, v in out.items()}
        scores = {f"agreement_{d}": float(agreement(logits[d], hold_t["logits"][d], tasks[d]))
                  for d in taught}
        scores |= {f"retention_{d}": float(agreement(logits[d], hold_t["prev_logits"][d],
                                                     tasks[d])) for d in retained}
        module.train()
        return {"agreement": float(np.mean(list(scores.values()))), **scores}

    best, since_best, history_loss = -1.0, 0, []
    best_state: dict[str, torch.Tensor] | None = None
    curve: list[dict[str, float]] = []
    for step in range(1, s.steps + 1):
        idx = torch.randint(len(x_train), (min(s.batch_size, len(x_train)),), generator=generator)
        xb = x_train[idx].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, logits, projected = module(xb)
        idx_d = idx.to(device)
        conf = torch.stack([train_t["conf"][d][idx_d] for d in taught])
        weights = teacher_weights(conf, s.weighting)
        kd = sum((weights[i] * kd_per_sample(logits[d], train_t["probs"][d][idx_d],
                                             s.temperature, tasks[d])).mean()
                 for i, d in enumerate(taught))
        feat = sum(feature_matching(projected[d], train_t["feats"][d][idx_d]).mean()
                   for d in taught) / len(taught)
        keep = (sum(kd_per_sample(logits[d], train_t["previous"][d][idx_d], s.temperature,
                                  tasks[d]).mean() for d in retained) / len(retained)
                if retained else torch.zeros((), device=device))
        loss = kd + s.beta * feat + s.gamma * keep
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history_loss.append([float(kd), float(feat), float(keep), float(loss)])
        if step % s.eval_every == 0 or step == s.steps:
            scores = evaluate()
            kd_m, feat_m, keep_m, loss_m = np.mean(history_loss, axis=0)
            history_loss = []
            improved = scores["agreement"] > best
            if improved:
                best, since_best = scores["agreement"], 0
                best_state = {k: v.detach().cpu().clone()
                              for k, v in unwrap(module).net.state_dict().items()}
            else:
                since_best += 1
            stop = since_best >= s.patience or step == s.steps
            row = {"step": float(step), "loss": float(loss_m), "kd": float(kd_m),
                   "feature": float(feat_m), "retention": float(keep_m),
                   "best_agreement": best, **scores}
            curve.append(row)
            # The checkpoint always holds the best student so far and the curve up to now,
            # so the latest checkpoint is the one to keep.
            payload = ({**best_state, CURVE_KEY: torch.tensor(
                [[r.get(k, float("nan")) for k in CURVE_FIELDS] for r in curve])}
                if improved or stop else None)
            report({**row, "stopped": float(stop)}, payload)
            if stop:
                break


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
    callbacks
        Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    """

    def __init__(self, model: ModelConfig, data: DataConfig, storage_path: str,
                 callbacks: list[Any] | None = None) -> None:
        self.model = model
        self.data = data
        self.storage_path = storage_path
        self.callbacks = callbacks or []

    def distil(self, request: DistillRequest) -> DistillResult:
        s = request.settings
        if not request.teachers:
            raise ValueError("distillation needs at least one teacher")
        result = fit_trainer(distill_loop, {"request": request, "model": self.model,
                                            "data": self.data},
                             num_workers=s.num_workers, use_gpu=s.use_gpu,
                             storage_path=self.storage_path, name=request.tag,
                             score=None, knob="distill", callbacks=self.callbacks,
                             gpus_per_worker=s.gpus_per_worker)
        state = load_checkpoint_state(result.checkpoint)
        table = state.pop(CURVE_KEY)
        curve = [dict(zip(CURVE_FIELDS, map(float, row), strict=True)) for row in table.tolist()]
        final = curve[-1]
        metrics = {"distill_steps": final["step"], "distill_agreement": final["best_agreement"],
                   "distill_loss": final["loss"]}
        return DistillResult(state=state, metrics=metrics, curve=curve)
