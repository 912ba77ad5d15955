"""The plain ``Client``: one hospital's data and training loop, testable without Ray.

A client reads only its own shards, once, and keeps them (as normalised tensors) on its
device. Between rounds it holds no model state of its own: the server hands it the model to
train or score each time, so a restarted client loses nothing and many virtual clients can
share one process. Only weights and scalar metrics ever leave it.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import DataConfig, ModelConfig, TrainConfig
from engine.data import (
    MedNISTSplitSettings,
    ShardBuilder,
    domain_catalog,
    resolve_cache_dir,
    resolve_data_root,
)
from engine.data.prepare import ShardRecipe
from engine.data.shards import Shard, read_shard
from engine.nn.metrics import auc_acc, scores_from_logits
from engine.nn.models import MultiHeadNet, build_model
from engine.nn.precision import autocast, autocast_dtype
from strategies.state import is_head_key
from strategies.types import ClientInfo, EvaluateIns, EvaluateRes, FitIns, FitRes, State

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClientSpec:
    """A client's data: shard paths (domain -> split -> path), or recipes that the client
    resolves on its own node (so multi-node clusters need no shared filesystem)."""

    cid: str
    shards: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    recipes: tuple[ShardRecipe, ...] = ()

    def resolve(self, data: DataConfig, builder: ShardBuilder | None = None) -> ClientSpec:
        """This spec with its recipes turned into shard paths on the current node
        (``builder``: one shared by many specs, so a partition is located once)."""
        if not self.recipes:
            return self
        builder = builder or shard_builder(data)
        shards = {r.domain: {s: str(p) for s, p in r.resolve(builder).items()}
                  for r in self.recipes}
        return ClientSpec(self.cid, shards=shards)


def shard_builder(data: DataConfig) -> ShardBuilder:
    """The :class:`~engine.data.ShardBuilder` of an experiment's data settings."""
    return ShardBuilder(domain_catalog(dict(data.extra_domains)),
                        resolve_data_root(data.data_root), resolve_cache_dir(data.cache_dir),
                        mednist=MedNISTSplitSettings(seed=data.mednist_seed),
                        download=data.download)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts, stable across processes (not Python's ``hash``)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def read_split(path: str, split: str, cap: int | None, seed: int) -> Shard:
    """One split of a client's shard, cut to a seeded subsample of ``cap`` samples if it is
    larger (the same subsample in every process)."""
    shard = read_shard(path)
    if cap is not None and len(shard) > cap:
        rng = np.random.default_rng(derive_seed(seed, shard.meta.owner, split))
        shard = shard.subset(np.sort(rng.choice(len(shard), cap, replace=False)))
    return shard


def epoch_batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches over ``n`` samples: a permutation drawn from ``generator``, cut
    into index batches of ``size`` (the last may be smaller)."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n, size)]


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` if given, else CUDA when this process sees a GPU, else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Split:
    x: torch.Tensor
    y: torch.Tensor


class Client:
    """One client: its shards in memory and the local training / evaluation loops.

    Parameters
    ----------
    spec
        Client id and shard paths (a pooled oracle client has several domains).
    model, train
        Network and local-training settings.
    seed
        Run seed; every random choice derives from (seed, round, client id).
    max_train_samples, max_eval_samples
        Optional caps (seeded subsample) of the train split and of val / test.
    device
        Force a device (default: CUDA if visible, else CPU).
    models
        A cache of networks shared by the clients of one process (key: the heads), so
        hundreds of virtual clients in one actor hold one model, not hundreds. Sharing is
        safe because a client loads the full received state before every use.
    """

    def __init__(self, spec: ClientSpec, model: ModelConfig, train: TrainConfig, *,
                 seed: int = 0, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, device: str | None = None,
                 models: dict[tuple, MultiHeadNet] | None = None) -> None:
        if spec.recipes:
            raise ValueError(f"client {spec.cid}: resolve its shard recipes first "
                             "(ClientSpec.resolve)")
        self.spec = spec
        self.cid = spec.cid
        self.train_cfg = train
        self.seed = seed
        self.device = pick_device(device)
        self.tasks: dict[str, str] = {}
        self.num_classes: dict[str, int] = {}
        self.data: dict[str, dict[str, _Split]] = {}
        for domain, paths in spec.shards.items():
            self.data[domain] = {}
            for split in SPLITS:
                cap = max_train_samples if split == "train" else max_eval_samples
                shard = read_split(paths[split], split, cap, seed)
                x, y = shard.tensors()
                assert y is not None, f"{paths[split]} has no labels"
                self.data[domain][split] = _Split(x.to(self.device), y.to(self.device))
                self.tasks[domain] = shard.meta.task
                self.num_classes[domain] = shard.meta.num_classes
        # train.precision, by the one rule of engine.nn.precision (bf16 on a CPU is real)
        self.autocast_dtype = autocast_dtype(train.precision, self.device)
        self.use_bf16 = self.autocast_dtype == torch.bfloat16
        key = tuple(sorted(self.num_classes.items()))
        shared = models.get(key) if models is not None else None
        if shared is None:
            shared = build_model(model, self.num_classes).to(self.device)
            if train.channels_last:
                shared = shared.to(memory_format=torch.channels_last)
            if models is not None:
                models[key] = shared
        self.model: MultiHeadNet = shared
        if train.channels_last:  # faster convolutions on GPUs and on CPUs (oneDNN) alike
            for splits in self.data.values():
                for s in splits.values():
                    s.x = s.x.contiguous(memory_format=torch.channels_last)

    # -- protocol --------------------------------------------------------------------------
    def info(self) -> ClientInfo:
        """What the client announces at onboarding (task and sizes, never data)."""
        return ClientInfo(cid=self.cid, domains=tuple(self.data), tasks=dict(self.tasks),
                          num_classes=dict(self.num_classes),
                          num_train=sum(len(d["train"].y) for d in self.data.values()))

    def fit(self, ins: FitIns) -> FitRes:
        """Train the received model on the private train split; return weights and metrics."""
        started = time.perf_counter()
        cfg = ins.config
        server_round = int(cfg.get("round", 0))
        fit_seed = derive_seed(cfg.get("seed", self.seed), server_round, self.cid)
        torch.manual_seed(fit_seed)
        generator = torch.Generator().manual_seed(fit_seed)
        # A fresh head depends on the run seed and its domain only, as if the server had
        # sent it: every client of a domain starts from the same head.
        self._load(ins.state, ins.fresh_heads, int(cfg.get("seed", self.seed)))
        epochs = int(cfg.get("epochs", self.train_cfg.local_epochs))
        lr = float(cfg.get("lr", self.train_cfg.lr))
        mu = float(cfg.get("proximal_mu", 0.0))
        select_on_val = bool(cfg.get("select_on_val", False))
        anchor = ({n: p.detach().clone() for n, p in self.model.encoder.named_parameters()}
                  if mu > 0 else None)
        optimizer = self._optimizer(lr)
        best: tuple[float, State] | None = None
        metrics: dict[str, float] = {}
        for epoch in range(epochs):
            metrics["train_loss"] = self._train_epoch(optimizer, generator, mu, anchor)
            if select_on_val:
                score = self._selection_score()
                if best is None or score > best[0]:
                    best = (score, self._export())
                    metrics["best_epoch"] = float(epoch + 1)
                    metrics["val_selection_score"] = score
        state = best[1] if best is not None else self._export()
        metrics["train_seconds"] = time.perf_counter() - started
        return FitRes(cid=self.cid, state=state, num_examples=self.info().num_train,
                      metrics=metrics)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Score the received model on the client's own ``ins.split``; metrics only."""
        self._load(ins.state, (), 0)
        metrics = {d: self._score(d, ins.split) for d in self.data}
        n = sum(len(self.data[d][ins.split].y) for d in self.data)
        return EvaluateRes(cid=self.cid, split=ins.split, metrics=metrics, num_examples=n)

    def finetune(self, ins: FitIns, split: str = "test") -> EvaluateRes:
        """Downstream fine-tuning: train as :meth:`fit` does, then score on the client's own
        ``split``. Only the metrics leave the client, not the fine-tuned weights."""
        res = self.fit(ins)
        return self.evaluate(EvaluateIns(res.state, split))

    # -- internals -------------------------------------------------------------------------
    def _load(self, state: State, fresh_heads: tuple[str, ...], seed: int) -> None:
        own = self.model.state_dict()
        fresh_keys = {k for d in fresh_heads for k in own if is_head_key(k, d)}
        missing = sorted(set(own) - set(state) - fresh_keys)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"client {self.cid}: received state does not fit its model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.model.load_state_dict(state, strict=False)
        for domain in fresh_heads:
            self.model.add_head(domain, self.num_classes[domain],
                                seed=derive_seed(seed, "head", domain))

    def _export(self) -> State:
        return {k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.model.state_dict().items()}

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        cfg = self.train_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, domain: str) -> torch.Tensor:
        if self.tasks[domain] == "multi-label":
            return F.binary_cross_entropy_with_logits(logits.float(), y.float())
        return F.cross_entropy(logits.float(), y.reshape(-1))

    def _batches(self, generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
        size = self.train_cfg.batch_size
        batches: list[tuple[str, torch.Tensor]] = []
        for domain, splits in self.data.items():
            batches += [(domain, idx) for idx in
                        epoch_batches(len(splits["train"].y), size, generator)]
        if len(self.data) > 1:  # interleave domains (pooled client)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return batches

    def _train_epoch(self, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     mu: float, anchor: dict[str, torch.Tensor] | None) -> float:
        self.model.train()
        total, count = 0.0, 0
        for domain, idx in self._batches(generator):
            split = self.data[domain]["train"]
            idx = idx.to(self.device)
            x, y = split.x[idx], split.y[idx]
            with autocast(self.train_cfg.precision, self.device):
                logits = self.model(x, domain)
            loss = self._loss(logits, y, domain)
            if anchor is not None:
                prox = sum(((p - anchor[n]) ** 2).sum()
                           for n, p in self.model.encoder.named_parameters())
                loss = loss + 0.5 * mu * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        return total / max(count, 1)

    @torch.no_grad()
    def logits(self, domain: str, split: str) -> torch.Tensor:
        """Logits of the current model on one of the client's own splits (stays local)."""
        self.model.eval()
        data = self.data[domain][split]
        out = []
        for i in range(0, len(data.y), 1024):
            with autocast(self.train_cfg.precision, self.device):
                out.append(self.model(data.x[i:i + 1024], domain).float())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes[domain])

    def _score(self, domain: str, split: str) -> dict[str, float]:
        logits = self.logits(domain, split)
        y = self.data[domain][split].y
        task = self.tasks[domain]
        result = auc_acc(scores_from_logits(logits, task), y, task)
        result["loss"] = float(self._loss(logits, y, domain)) if len(y) else math.nan
        return result

    def _selection_score(self) -> float:
        """Mean val AUC over the client's domains (negative val loss if AUC is undefined)."""
        scores = [self._score(d, "val") for d in self.data]
        aucs = [s["auc"] for s in scores if not math.isnan(s["auc"])]
        return sum(aucs) / len(aucs) if aucs else -sum(s["loss"] for s in scores)

    def describe(self) -> dict[str, Any]:
        """Device and sizes, for logs and tests."""
        return {"cid": self.cid, "device": str(self.device), "bf16": self.use_bf16,
                "sizes": {d: {s: len(v.y) for s, v in sp.items()} for d, sp in self.data.items()}}
