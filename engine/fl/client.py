"""The plain ``Client``: one hospital's data and training loop, testable without Ray.

A client reads only its own shards, once, and keeps them (as normalised tensors) on its
device. Between rounds it holds no model state of its own: the server hands it the model to
train or score each time, so a restarted client loses nothing and many virtual clients can
share one process. Only weights and scalar metrics ever leave it (with
``privacy.transfer: predictions``, not even weights: its teacher's outputs on the public
pool instead, :meth:`Client.pool_outputs`).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LRScheduler

from engine.config import DataConfig, ModelConfig, TrainConfig
from engine.data import (
    MedNISTSplitSettings,
    PoolSettings,
    ShardBuilder,
    domain_catalog,
    resolve_cache_dir,
    resolve_data_root,
)
from engine.data.prepare import ShardRecipe
from engine.data.shards import Shard, read_shard
from engine.fl.dpsgd import DPTraining
from engine.fl.probe import (
    DEFAULT_K,
    EVAL_MODES,
    knn_loss,
    knn_scores,
    score_logits,
    stratified_subset,
    train_linear_head,
)
from engine.fl.relevance import PublicPool
from engine.nn.augment import BatchAugment
from engine.nn.metrics import auc_acc, scores_from_logits
from engine.nn.models import MultiHeadNet, build_model
from engine.nn.precision import autocast, autocast_dtype, grad_scaler, optimizer_step
from engine.nn.privacy import used_parameters
from engine.nn.schedule import build_scheduler
from strategies.state import is_head_key
from strategies.types import (
    ClientInfo,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    PoolOutputs,
    State,
)

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
    """The :class:`~engine.data.ShardBuilder` of an experiment's data settings (its pool:
    the MedNIST half, ``data.pool_share`` of every client domain's train split, drawn with
    ``data.mednist_seed``, and the whole train split of each of ``data.pool_sources``)."""
    pool = PoolSettings(share=data.pool_share, seed=data.mednist_seed, domains=data.domains,
                        sources=data.pool_sources)
    return ShardBuilder(domain_catalog(dict(data.extra_domains)),
                        resolve_data_root(data.data_root), resolve_cache_dir(data.cache_dir),
                        mednist=MedNISTSplitSettings(seed=data.mednist_seed),
                        download=data.download, pool=pool)


def read_pool(data: DataConfig) -> Shard:
    """The server's public pool shard as the distillation reads it: found (or built) on the
    node this runs on and cut to ``data.pool_size`` with ``data.mednist_seed``
    (:meth:`~engine.data.ShardBuilder.pool_shard`). Its images, in this order, are the rows
    of a client's ``pool_scores`` and of a teacher's ``sample_weights``."""
    return shard_builder(data).pool_shard(data.pool_size, data.mednist_seed)


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


def seed_torch(seed: int) -> None:
    """What ``torch.manual_seed`` does for the devices this process can use: the CPU
    generator, and CUDA's when a GPU is visible. (On a CPU-only host ``torch.manual_seed``
    also queues a lazy CUDA seeding with a recorded stack, ~3 ms a call: a cost per client
    update that thousands of virtual clients pay.)"""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


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
    pool
        Loads the server's public pool (:class:`~engine.fl.relevance.PublicPool`: its
        images in the order and cap of :func:`read_pool`), called when a fit asks for pool
        scores (``score_pool``) or pool outputs (``pool_outputs``); the loader may cache.
        ``None``: the client cannot score the pool or return outputs on it.
    """

    def __init__(self, spec: ClientSpec, model: ModelConfig, train: TrainConfig, *,
                 seed: int = 0, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, device: str | None = None,
                 models: dict[tuple, MultiHeadNet] | None = None,
                 pool: Callable[[], PublicPool] | None = None) -> None:
        if spec.recipes:
            raise ValueError(f"client {spec.cid}: resolve its shard recipes first "
                             "(ClientSpec.resolve)")
        self.spec = spec
        self.cid = spec.cid
        self.pool = pool
        self.kept_teacher: State | None = None  # the audit's reference (keep_teacher)
        self.model_cfg = model
        # the encoder family it trains its teachers in when not the global one
        self.arch = model.own_arch(list(spec.shards))
        self.train_cfg = train
        self.seed = seed
        self.device = pick_device(device)
        self.tasks: dict[str, str] = {}
        self.num_classes: dict[str, int] = {}
        # per domain, the normalisation (mean, std) of its train shard
        self.norms: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
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
                if split == "train":
                    self.norms[domain] = (tuple(shard.meta.mean), tuple(shard.meta.std))
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
                          num_train=sum(len(d["train"].y) for d in self.data.values()),
                          arch=self.arch)

    def fit(self, ins: FitIns) -> FitRes:
        """Train the received model (:meth:`_fit`), or, with ``config["arch"]`` (the family
        this client declares, :attr:`ClientInfo.arch`), a fresh model of the client's own
        encoder family seeded by the run seed and the client id (``ins.state`` must then be
        empty: nothing of the global model fits it). The shared network is untouched.

        Raises
        ------
        ValueError
            For an ``arch`` the client does not declare, or a non-empty ``state`` with it.
        """
        arch = ins.config.get("arch")
        if arch is None:
            return self._fit(ins)
        if arch != self.arch or ins.state:
            raise ValueError(f"client {self.cid}: asked to train encoder family {arch!r} "
                             f"(with {len(ins.state)} received tensors); it declares "
                             f"{self.arch!r} and takes no state for it")
        seed = int(ins.config.get("seed", self.seed))
        seed_torch(derive_seed(seed, "own-arch", arch, self.cid))
        own = build_model(self.model_cfg.for_arch(str(arch)), self.num_classes).to(self.device)
        if self.train_cfg.channels_last:
            own = own.to(memory_format=torch.channels_last)
        for domain in self.num_classes:  # as a fresh head is made for the global model
            own.add_head(domain, self.num_classes[domain],
                         seed=derive_seed(seed, "head", domain))
        shared, self.model = self.model, own
        try:
            return self._fit(ins)
        finally:
            self.model = shared

    def _fit(self, ins: FitIns) -> FitRes:
        """Train the received model on the private train split; return weights and metrics.

        The learning-rate schedule (``train.schedule``, ``train.warmup_epochs``; see
        :mod:`engine.nn.schedule`) spans this one call's epochs and is stepped per batch.

        With ``config["score_pool"]`` true, the returned model (the selected epoch's) then
        scores every public pool image for how much it looks like the client's own train
        images (:meth:`pool_scores`): ``FitRes.pool_scores``, one float per pool image and
        nothing about a private one (its time counts in ``train_seconds``).
        """
        started = time.perf_counter()
        cfg = ins.config
        server_round = int(cfg.get("round", 0))
        fit_seed = derive_seed(cfg.get("seed", self.seed), server_round, self.cid)
        seed_torch(fit_seed)
        generator = torch.Generator().manual_seed(fit_seed)
        # A fresh head depends on the run seed and its domain only, as if the server had
        # sent it: every client of a domain starts from the same head.
        if "arch" not in cfg:  # (its own family's model was made fresh by fit)
            self._load(ins.state, ins.fresh_heads, int(cfg.get("seed", self.seed)))
        epochs = int(cfg.get("epochs", self.train_cfg.local_epochs))
        lr = float(cfg.get("lr", self.train_cfg.lr))
        mu = float(cfg.get("proximal_mu", 0.0))
        select_on_val = bool(cfg.get("select_on_val", False))
        anchor = ({n: p.detach().clone() for n, p in self.model.encoder.named_parameters()}
                  if mu > 0 else None)
        # privacy.dp: DP-SGD by the plan the fit config carries (None: plain training)
        dp = self._dp_training(cfg)
        optimizer = self._optimizer(lr, dp=dp)
        # the schedule spans this call's epochs, stepped per batch (None: constant rate)
        tc = self.train_cfg
        steps_per_epoch = (dp.steps_per_epoch() if dp is not None else
                           sum(math.ceil(len(d["train"].y) / tc.batch_size)
                               for d in self.data.values()))
        scheduler = build_scheduler(optimizer, tc.schedule, epochs=epochs,
                                    steps_per_epoch=steps_per_epoch,
                                    warmup_epochs=tc.warmup_epochs, milestones=tc.milestones,
                                    gamma=tc.gamma)
        # train.augment (MONAI, on the device, seeded by the fit; None: no augmentation) and
        # fp16's loss scaler (None for every other precision)
        augment = (BatchAugment(tc.augment, derive_seed(fit_seed, "augment"))
                   if tc.augment else None)
        scaler = grad_scaler(tc.precision, self.device)
        best: tuple[float, State] | None = None
        metrics: dict[str, float] = {}
        for epoch in range(epochs):
            metrics["train_loss"] = self._train_epoch(optimizer, generator, mu, anchor,
                                                      scheduler=scheduler, augment=augment,
                                                      scaler=scaler, dp=dp)
            if select_on_val:
                score = self._selection_score()
                if best is None or score > best[0]:
                    best = (score, self._export())
                    metrics["best_epoch"] = float(epoch + 1)
                    metrics["val_selection_score"] = score
        state = best[1] if best is not None else self._export()
        pool_scores = (self.pool_scores(state, derive_seed(fit_seed, "pool-scores"))
                       if cfg.get("score_pool", False) else None)
        pool_outputs = None
        if cfg.get("pool_outputs", False):  # the teacher stays home: its outputs leave
            pool_outputs = self.pool_outputs(state)
            if cfg.get("keep_teacher", False):  # stays here too, for the privacy audit
                self.kept_teacher = state
            state = {}
        if dp is not None:  # the steps taken, for the driver's accountant (engine.fl.dpsgd)
            metrics.update(dp.metrics())
        metrics["train_seconds"] = time.perf_counter() - started
        return FitRes(cid=self.cid, state=state, num_examples=self.info().num_train,
                      metrics=metrics, pool_scores=pool_scores, pool_outputs=pool_outputs)

    @torch.no_grad()
    def pool_outputs(self, state: State, chunk: int = 1024) -> PoolOutputs:
        """The outputs of model ``state`` (loaded) on every public pool image, in one pass:
        its encoder's features and each of its domains' head logits, in float32 without
        autocast (as the distillation runs frozen teachers), on the CPU, in the pool's order.

        Raises
        ------
        ValueError
            When the client was given no pool loader.
        """
        images = self._public_pool("pool outputs (pool_outputs)").images
        self._load(state, (), 0)
        self.model.eval()
        feats: list[torch.Tensor] = []
        logits: dict[str, list[torch.Tensor]] = {d: [] for d in self.data}
        for i in range(0, len(images), chunk):
            f = self.model.features(images[i:i + chunk].to(self.device)).float()
            feats.append(f.cpu())
            for d in self.data:
                logits[d].append(self.model.heads[d](f).float().cpu())
        return PoolOutputs(features=torch.cat(feats).contiguous(),
                           logits={d: torch.cat(v).contiguous() for d, v in logits.items()})

    def _public_pool(self, asked: str) -> Any:
        """The public pool's shard, or ``ValueError`` saying what was ``asked`` for."""
        if self.pool is None:
            raise ValueError(f"client {self.cid}: asked for {asked} but it has no public "
                             "pool to read")
        return self.pool()

    def pool_scores(self, state: State, seed: int) -> torch.Tensor:
        """How much every public pool image looks like this client's own data.

        ``state`` is loaded; its frozen encoder's features of the client's own train images
        (every domain's; a seeded subsample of at most
        :data:`~engine.fl.relevance.MAX_SAMPLES`, put on the pool's intensity scale by
        :func:`~engine.fl.relevance.renormalise`) and of the pool images train a
        one-vs-public discriminator (:func:`~engine.fl.relevance.pool_relevance`, seeded
        by ``seed``), whose sigmoid probability is each pool image's score.

        Returns
        -------
        torch.Tensor
            ``(pool size,)`` float32 in ``[0, 1]`` on the CPU, in the pool's order.

        Raises
        ------
        ValueError
            When the client was given no pool loader.
        """
        from engine.fl.relevance import MAX_SAMPLES, pool_relevance, renormalise, sample_rows

        pool = self._public_pool("pool scores (score_pool)")
        self._load(state, (), 0)
        sizes = [len(s["train"].y) for s in self.data.values()]
        keep = torch.from_numpy(sample_rows(sum(sizes), MAX_SAMPLES,
                                            np.random.default_rng([seed, 0x0C11])))
        own, start = [], 0
        for (domain, splits), n in zip(self.data.items(), sizes, strict=True):
            rows = keep[(keep >= start) & (keep < start + n)] - start
            start += n
            if len(rows):
                x = splits["train"].x[rows.to(self.device)]
                own.append(self._image_features(renormalise(x, *self.norms[domain],
                                                             pool.mean, pool.std)))
        return pool_relevance(torch.cat(own), self._image_features(pool.images), seed)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Score the received model on the client's own ``ins.split``; metrics only."""
        self._load(ins.state, (), 0)
        metrics = {d: self._score(d, ins.split) for d in self.data}
        n = sum(len(self.data[d][ins.split].y) for d in self.data)
        return EvaluateRes(cid=self.cid, split=ins.split, metrics=metrics, num_examples=n)

    def finetune(self, ins: FitIns, split: str = "test") -> EvaluateRes:
        """Judge the received encoder on the client's own data; only metrics leave it.

        ``ins.config`` selects the evaluation (absent keys: plain fine-tuning, as before):

        * ``mode``: ``"finetune"`` (default) trains the encoder and a fresh head as
          :meth:`fit` does, then scores the result on ``split``; ``"linear_probe"`` freezes
          the encoder and trains only a fresh linear head on its features
          (:func:`engine.fl.probe.train_linear_head`: ``epochs``, ``lr``, the best
          validation epoch); ``"knn"`` scores a k-NN vote on its features
          (:func:`engine.fl.probe.knn_scores`, ``k`` neighbours, default 11).
        * ``label_fraction`` (default 1): the share of each class of the train split that
          is labelled (:func:`engine.fl.probe.stratified_subset`, fixed by ``subset_seed``,
          default ``seed``, the client id and the domain); val and test are never cut.

        Every domain's metrics are ``auc``, ``acc`` and ``loss`` (k-NN: the cross-entropy of
        the smoothed vote, :func:`engine.fl.probe.knn_loss`), plus ``n_labelled`` (train
        samples used) whenever the config names ``mode`` or ``label_fraction``.

        Raises
        ------
        ValueError
            For an unknown ``mode``, a ``label_fraction`` outside ``(0, 1]`` or ``k < 1``.
        """
        cfg = ins.config
        split = str(cfg.get("split", split))  # evaluation.split=val tunes without test
        if split not in SPLITS[1:]:
            raise ValueError(f"client {self.cid}: cannot score on split {split!r}")
        mode = str(cfg.get("mode", "finetune"))
        if mode not in EVAL_MODES:
            raise ValueError(f"client {self.cid}: unknown evaluation mode {mode!r}; "
                             f"valid modes are {list(EVAL_MODES)}")
        if "mode" not in cfg and "label_fraction" not in cfg:  # today's path, untouched
            res = self.fit(ins)
            return self.evaluate(EvaluateIns(res.state, split))
        labelled = self._labelled(cfg)
        if mode == "linear_probe":
            return self._linear_probe(ins, split, labelled)
        if mode == "knn":
            return self._knn(ins, split, labelled)
        return self._finetune_labelled(ins, split, labelled)

    def audit(self, ins: FitIns) -> EvaluateRes:
        """Membership-inference audit of the received model on the client's own data
        (members: its train split; non-members: ``config["split"]``, default test); only
        the attack's scalars leave it (:func:`engine.fl.audit.audit_model`)."""
        from engine.fl.audit import audit_model

        return audit_model(self, ins)

    # -- internals -------------------------------------------------------------------------
    def _load(self, state: State, fresh_heads: tuple[str, ...], seed: int) -> None:
        """Copy ``state`` into the model's tensors in place (what ``load_state_dict``
        does, without its module walk); then fresh seeded heads for ``fresh_heads``."""
        own = self._tensors()
        fresh_keys = {k for d in fresh_heads for k in own if is_head_key(k, d)}
        missing = sorted(set(own) - set(state) - fresh_keys)
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"client {self.cid}: received state does not fit its model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"wrong shape {wrong[:5]})")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        for domain in fresh_heads:
            self.model.add_head(domain, self.num_classes[domain],
                                seed=derive_seed(seed, "head", domain))

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The model's state tensors by key (cached by a :class:`MultiHeadNet`)."""
        model = self.model
        if isinstance(model, MultiHeadNet):
            return model.state_tensors()
        return dict(model.state_dict(keep_vars=True))

    def _export(self) -> State:
        """A copy of the model's state on the CPU, contiguous, every tensor with a storage of
        its own (views of one buffer would each pickle the whole buffer)."""
        with torch.no_grad():
            return {k: v.detach().to("cpu", copy=True).contiguous()
                    for k, v in self._tensors().items()}

    def _optimizer(self, lr: float, dp: DPTraining | None = None) -> torch.optim.Optimizer:
        cfg = self.train_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        if dp is not None:  # DP-SGD: only what the forward reaches has per-sample gradients
            domain, split = next((d, s["train"]) for d, s in self.data.items())
            params = used_parameters(self.model, split.x[:2], domain)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    def _batch_loss(self, domain: str, idx: torch.Tensor, augment: Any = None) -> torch.Tensor:
        """The training loss of the train images ``idx`` of ``domain`` (augmented first when
        ``augment`` is given), the forward pass under ``train.precision``."""
        split = self.data[domain]["train"]
        idx = idx.to(self.device)
        x, y = split.x[idx], split.y[idx]
        if augment is not None:
            x = augment(x)
        with autocast(self.train_cfg.precision, self.device):
            logits = self.model(x, domain)
        return self._loss(logits, y, domain)

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
                     mu: float, anchor: dict[str, torch.Tensor] | None, *,
                     scheduler: LRScheduler | None = None,
                     augment: BatchAugment | None = None,
                     scaler: torch.amp.GradScaler | None = None,
                     dp: DPTraining | None = None) -> float:
        """One epoch over the train split; the mean training loss. ``scheduler`` is stepped
        after every optimisation step; ``train.grad_clip`` clips the global gradient norm
        before it (the loss is float32 under bf16 autocast, so no scaler is involved; under
        fp16 ``scaler`` scales it, :func:`~engine.nn.precision.optimizer_step`). ``augment``
        transforms each batch's images first (:mod:`engine.nn.augment`). With ``dp``, the
        epoch is DP-SGD instead (:meth:`_dp_epoch`)."""
        if dp is not None:
            return self._dp_epoch(optimizer, generator, mu, anchor, dp, scheduler=scheduler,
                                  augment=augment)
        self.model.train()
        clip = self.train_cfg.grad_clip
        total, count = 0.0, 0
        for domain, idx in self._batches(generator):
            loss = self._batch_loss(domain, idx, augment)
            if anchor is not None:
                prox = sum(((p - anchor[n]) ** 2).sum()
                           for n, p in self.model.encoder.named_parameters())
                loss = loss + 0.5 * mu * prox
            optimizer.zero_grad(set_to_none=True)
            optimizer_step(loss, optimizer, scaler, clip=clip,
                           parameters=self.model.parameters())
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        return total / max(count, 1)

    def _dp_training(self, cfg: Mapping[str, Any]) -> DPTraining | None:
        """The fit's DP-SGD (:class:`~engine.fl.dpsgd.DPTraining`) when its config carries a
        plan, else ``None``.

        Raises
        ------
        ValueError
            For a client of several domains (its sampling rate would differ per domain) or
            pool scores asked of a DP fit (their discriminator trains on the private images
            without DP).
        """
        dp = DPTraining.from_config(cfg)
        if dp is None:
            return None
        if len(self.data) != 1:
            raise ValueError(f"client {self.cid}: DP-SGD trains a client of one domain, this "
                             f"one holds {sorted(self.data)}")
        if cfg.get("score_pool", False):
            raise ValueError(f"client {self.cid}: pool scores (score_pool) come from a "
                             "discriminator trained on the private images without DP; a DP "
                             "fit cannot release them (turn the strategy's relevance off)")
        return dp

    def _dp_epoch(self, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                  mu: float, anchor: dict[str, torch.Tensor] | None, dp: DPTraining, *,
                  scheduler: LRScheduler | None = None,
                  augment: BatchAugment | None = None) -> float:
        """One DP-SGD epoch of the client's one domain: ``int(1 / q)`` Poisson batches
        (:meth:`DPTraining.batches`), per-sample gradients clipped to ``max_grad_norm`` and
        noised (:meth:`DPTraining.step`); FedProx's proximal pull (``mu``) is added to the
        noised gradient (it depends on the weights only, so it costs no privacy). The hooks
        live for this epoch only. Returns the mean training loss (data term only)."""
        (domain, splits), = self.data.items()
        split = splits["train"]
        n = len(split.y)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        private = dp.attach(self.model, optimizer, n)
        encoder = dict(self.model.encoder.named_parameters())

        def proximal() -> None:
            with torch.no_grad():
                for name, ref in (anchor or {}).items():
                    p = encoder[name]
                    if p.grad is not None:
                        p.grad.add_(p.detach() - ref, alpha=mu)

        self.model.train()
        total, count = 0.0, 0
        try:
            for idx in dp.batches(n, generator):
                if not len(idx):
                    dp.skip_empty(private)
                    if scheduler is not None:
                        scheduler.step()
                    continue
                loss = self._batch_loss(domain, idx, augment)
                private.zero_grad(set_to_none=True)
                loss.backward()
                dp.step(private, proximal if anchor is not None and mu > 0 else None)
                if scheduler is not None:
                    scheduler.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        finally:
            private.zero_grad(set_to_none=True)
            dp.detach()
            for p in params:
                p.grad = None
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

    # -- evaluation modes (finetune's linear probe, k-NN and few-shot) ---------------------
    def _labelled(self, cfg: Mapping[str, Any]) -> dict[str, torch.Tensor | None]:
        """Per domain, the indices of the labelled train samples (``None``: all of them),
        from ``label_fraction`` and ``subset_seed`` (default: ``seed``, then the client's)."""
        fraction = float(cfg.get("label_fraction", 1.0))
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"client {self.cid}: label_fraction must be in (0, 1], "
                             f"got {fraction}")
        if fraction == 1.0:
            return dict.fromkeys(self.data)
        subset_seed = cfg.get("subset_seed", cfg.get("seed", self.seed))
        return {d: stratified_subset(s["train"].y, fraction,
                                     derive_seed(subset_seed, "labelled", self.cid, d)
                                     ).to(self.device)
                for d, s in self.data.items()}

    def _finetune_labelled(self, ins: FitIns, split: str,
                           labelled: Mapping[str, torch.Tensor | None]) -> EvaluateRes:
        """Fine-tuning (:meth:`fit`, then :meth:`evaluate`) on the labelled train subset:
        the train splits are swapped for their subsets for the call, and restored after."""
        saved = {d: s["train"] for d, s in self.data.items()}
        try:
            for domain, idx in labelled.items():
                if idx is not None:
                    full = saved[domain]
                    x = full.x[idx]
                    if self.train_cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    self.data[domain]["train"] = _Split(x, full.y[idx])
            res = self.fit(ins)
        finally:
            for domain, full in saved.items():
                self.data[domain]["train"] = full
        out = self.evaluate(EvaluateIns(res.state, split))
        for domain, metrics in out.metrics.items():
            metrics["n_labelled"] = float(self._n_labelled(domain, labelled))
        return out

    def _n_labelled(self, domain: str, labelled: Mapping[str, torch.Tensor | None]) -> int:
        idx = labelled[domain]
        return len(self.data[domain]["train"].y) if idx is None else len(idx)

    @torch.no_grad()
    def _features(self, domain: str, split: str) -> torch.Tensor:
        """The current encoder's features of one split: eval mode, under the client's
        autocast setting, returned as float32."""
        return self._image_features(self.data[domain][split].x)

    @torch.no_grad()
    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        """The current encoder's float32 features of images ``x`` (any device; moved to the
        client's in chunks), in eval mode under the client's autocast setting."""
        self.model.eval()
        out = []
        for i in range(0, len(x), 1024):
            xb = x[i:i + 1024].to(self.device)
            if self.train_cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(self.train_cfg.precision, self.device):
                out.append(self.model.features(xb).float())
        return (torch.cat(out) if out
                else torch.zeros(0, self.model.out_features, device=self.device))

    def _frozen_features(self, ins: FitIns, labelled: Mapping[str, torch.Tensor | None]
                         ) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Load the received state (fresh heads as :meth:`fit` makes them) and compute, once,
        every domain's (features, labels) of the labelled train subset, val and test."""
        self._load(ins.state, ins.fresh_heads, int(ins.config.get("seed", self.seed)))
        out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for domain, splits in self.data.items():
            out[domain] = {s: (self._features(domain, s), splits[s].y) for s in SPLITS}
            idx = labelled[domain]
            if idx is not None:
                feats, y = out[domain]["train"]
                out[domain]["train"] = (feats[idx], y[idx])
        return out

    def _linear_probe(self, ins: FitIns, split: str,
                      labelled: Mapping[str, torch.Tensor | None]) -> EvaluateRes:
        """Frozen encoder, a fresh linear head per domain trained on its features (AdamW,
        ``lr`` else ``train.lr``, :data:`engine.fl.probe.PROBE_WEIGHT_DECAY`), the epoch of
        the best val score kept per domain (for one domain: :meth:`_selection_score`'s rule),
        scored on ``split``."""
        cfg = ins.config
        epochs = int(cfg.get("epochs", self.train_cfg.local_epochs))
        lr = float(cfg.get("lr", self.train_cfg.lr))
        fit_seed = derive_seed(cfg.get("seed", self.seed), int(cfg.get("round", 0)), self.cid)
        generator = torch.Generator().manual_seed(fit_seed)
        feats = self._frozen_features(ins, labelled)
        metrics: dict[str, dict[str, float]] = {}
        for domain, f in feats.items():
            if domain in ins.fresh_heads:  # a fresh head's init, as fine-tuning starts from
                head = self.model.heads[domain]
                weight, bias = head.weight.detach(), head.bias.detach()
            else:  # no fresh head asked for: start from zero (the received head is unused)
                weight = torch.zeros(self.num_classes[domain], self.model.out_features,
                                     device=self.device)
                bias = torch.zeros(self.num_classes[domain], device=self.device)
            trained = train_linear_head(*f["train"], *f["val"], self.tasks[domain], weight,
                                        bias, epochs=epochs, lr=lr,
                                        batch_size=self.train_cfg.batch_size,
                                        generator=generator)
            test_feats, test_y = f[split]
            metrics[domain] = score_logits(trained(test_feats), test_y, self.tasks[domain])
            metrics[domain]["n_labelled"] = float(len(f["train"][1]))
        return self._metrics_res(split, metrics)

    def _knn(self, ins: FitIns, split: str,
             labelled: Mapping[str, torch.Tensor | None]) -> EvaluateRes:
        """Frozen encoder, a weighted k-NN vote (``k``, default 11, clamped to the labelled
        samples) over the labelled train features, scored on ``split``."""
        k = int(ins.config.get("k", DEFAULT_K))
        if k < 1:
            raise ValueError(f"client {self.cid}: k must be >= 1, got {k}")
        feats = self._frozen_features(ins, labelled)
        metrics: dict[str, dict[str, float]] = {}
        for domain, f in feats.items():
            task = self.tasks[domain]
            train_feats, train_y = f["train"]
            test_feats, test_y = f[split]
            scores = knn_scores(train_feats, train_y, test_feats, k,
                                self.num_classes[domain], task)
            metrics[domain] = auc_acc(scores, test_y, task)
            metrics[domain]["loss"] = knn_loss(scores, test_y, task)
            metrics[domain]["n_labelled"] = float(len(train_y))
        return self._metrics_res(split, metrics)

    def _metrics_res(self, split: str, metrics: dict[str, dict[str, float]]) -> EvaluateRes:
        n = sum(len(self.data[d][split].y) for d in self.data)
        return EvaluateRes(cid=self.cid, split=split, metrics=metrics, num_examples=n)
