"""``umim bench crossdevice``: thousands of small clients, a sample of them trained per round.

The cross-device case of federated simulation (McMahan et al. 2017's ``C``): all of MedNIST
(58,954 grey 64 x 64 images, 6 classes, unified to ``3 x 28 x 28`` by the data plane) as one
client domain split over ``clients`` clients with Dirichlet label skew, a small stateless CNN
(``model.arch=cnn``, about 105k parameters), ``per_round`` clients sampled per round by the
engine's own seeded sampling (:class:`strategies.sampling.ClientSampling`), one local epoch
of plain SGD, FedAvg. Orchestration, not compute, is the cost here.

Rows, run back to back in one command on the same data, model, initial weights, sampled
clients and batches:

1. ``sequential``: one process, the plain compute loop (one model; for each sampled client
   the global weights loaded in place, its batches trained with ``torch.optim.SGD``, the
   sample-weighted average accumulated). Its time is the compute floor, on one actor's CPU
   share (``clients.num_cpus`` threads).
2. ``umim`` (and any other name of :data:`ENGINE_ROWS`, each a set of config overrides):
   this engine (:class:`~engine.run.session.Session`, ``build_simulation``,
   :class:`~engine.fl.simulation.Simulation`), timed from Ray's start to the last
   aggregation, its start-up (Ray, the actors loading their clients' shards) reported apart.
3. ``flower``: Flower 1.42 ``run_simulation`` in a child process
   (:mod:`engine.bench.crossdevice_flower`), a ``ClientApp`` written as Flower's docs write
   one, and a ``ServerApp`` whose FedAvg trains, each round, the nodes of the partitions the
   engine samples; the same CPUs per client actor and the same number of actors.
4. ``pfl``: pfl-research, from :mod:`engine.bench.crossdevice_pfl` when that module is there
   (``run_pfl(workload_dir, out_dir) -> (wall_s, state)``); otherwise the row says
   ``not run: <reason>``.

Per row: rounds/s and client updates/s of the rounds (the row's time less its start-up),
the per-update orchestration overhead ``(rounds_s - sequential rounds_s) / updates`` in ms,
start-up seconds, the peak resident memory summed over every process of the row
(:class:`~engine.bench.scale.MemoryPeak`), the central test accuracy of the final global
model on the domain's whole test split (one evaluator for every row) and the largest
absolute difference of its final state from the sequential row's. The comparison fails
(:attr:`CrossDeviceResult` ``passed`` false, a non-zero exit in the CLI) when a row trained
other clients than the sampled ones, or its accuracy or state differ from the sequential
row's beyond :data:`ACC_TOLERANCE` / :data:`STATE_TOLERANCE`.

Export for the out-of-process rows (:func:`export_workload`; read back by
:func:`read_export`)
-----------------------------------------------------------------------------------------
A folder of three files:

``workload.json``
    ``{"cids": [engine client ids, sorted as strings; the index is the partition id],
    "domain": name, "num_classes": 6, "rounds": R, "batch_size": B, "lr": lr,
    "momentum": m, "weight_decay": wd, "local_epochs": E, "seed": s,
    "sampled": [[partition ids trained in round r, ascending] for r in 1..R],
    "model": the config's ``model`` section as a dict, "threads": torch threads of one
    engine actor (``clients.num_cpus``), as the sequential row trains}``. The network is
    ``engine.nn.models.build_model(from_dict(ModelConfig, model), {domain: num_classes})``;
    ``net(x, domain)`` gives the logits.
``train.npz``
    ``x``: float32 ``[N, 3, 28, 28]``, exactly the tensors each engine client trains on
    (its shard's uint8 images normalised with that client's own train mean / std; MedNIST's
    grey channel is repeated to the three unified channels); ``y``: int64 ``[N]``;
    ``offsets``: int64 ``[len(cids) + 1]``, partition ``i``'s samples are
    ``x[offsets[i]:offsets[i + 1]]``.
``init.pt``
    The initial global state dict (``torch.load(..., weights_only=True)``; the engine's key
    names, ``encoder.*`` and ``heads.<domain>.*``).

A client update, as :meth:`engine.fl.client.Client.fit` does it: partition ``i``
(``cid = cids[i]``, ``n_i`` samples) in round ``r`` (1-based) loads the global state, makes
one generator ``g = torch.Generator().manual_seed(derive_seed(seed, r, cid))`` with
``derive_seed(*parts) = zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF``
(:func:`engine.fl.client.derive_seed`), and for each of the ``E`` epochs in turn draws
``epoch_batches(n_i, B, g)`` (:func:`engine.fl.client.epoch_batches`: ``order =
torch.randperm(n_i, generator=g)`` cut into ``order[k:k + B]``; the same generator runs on
across epochs). Each batch: ``loss = cross_entropy(net(x[idx], domain), y[idx])``,
``zero_grad``, ``backward``, ``step`` of a ``torch.optim.SGD(lr, momentum, weight_decay)``
made fresh for the update; float32, no autocast. The round's new global state is
``sum_i (n_i / sum_j n_j) * state_i`` over the round's partitions, accumulated in float64 in
ascending partition id order and cast back to float32
(:func:`strategies.aggregate.weighted_average`, FedAvg of the whole model for one domain).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.bench.scale import MemoryPeak
from engine.config import ExperimentConfig, ModelConfig, from_dict, to_dict
from engine.data import DataError, resolve_cache_dir, resolve_data_root
from engine.data.mednist import (
    MEDNIST_CLASSES,
    list_mednist,
    load_mednist,
    mednist_paths,
    stratified_take,
)
from engine.data.prepare import PARTITION_COMPLETE, ShardRecipe
from engine.data.sources.base import file_fingerprint, files_fingerprint
from engine.fl.client import (
    Client,
    ClientSpec,
    derive_seed,
    epoch_batches,
    pick_device,
    read_split,
    shard_builder,
)
from engine.records.storage import atomic_path
from engine.run.session import client_specs, initial_encoder, resolve_paths
from strategies.types import EvaluateIns, State

logger = logging.getLogger(__name__)

DOMAIN = "mednist-all"
"""The one client domain: every MedNIST image and class."""
SPLIT = (0.7, 0.1, 0.2)
SPLIT_SEED = 0
"""The domain's train / val / test fractions (stratified per class) and the seed of that
split (a data seed: the same for every run seed)."""
ROWS = ("sequential", "umim", "flower", "pfl")
ENGINE_ROWS: dict[str, dict[str, Any]] = {
    "umim": {"clients": {"dispatch": "actor", "fused_clients": 0}},
    "umim-fused": {"clients": {"dispatch": "actor", "fused_clients": 16}},
    "umim-per-client": {"clients": {"dispatch": "client", "fused_clients": 0}},
}
"""Engine rows: name -> overrides of the experiment's config sections (nested dicts merged
into the bench's config). ``umim``: the cross-device path (``clients.dispatch: actor``: one
task per actor's share of a round); ``umim-fused``: the same with its clients trained in
fused ``torch.func`` steps of up to 16 (``clients.fused_clients``; slower than one by one on
this 2-core CPU for this CNN, see docs/performance.md, kept for GPUs); ``umim-per-client``:
the engine's default dispatch, a task per client update."""
ACC_TOLERANCE = 0.005
"""Largest accepted difference of a row's central test accuracy from the sequential row's
(59 of the 11,791 test images; measured on 1000 clients x 10 rounds: no difference)."""
STATE_TOLERANCE = 2e-3
"""Largest accepted absolute difference of a row's final weights from the sequential
row's: float32 rounding of the same computation, which SGD amplifies over the rounds.
Measured on 1000 clients, 50 a round: 10 rounds, 0 for the engine's per-client path
(bit-identical) and 1.3e-6 for Flower (its float32 average, summed in reply order); 30
rounds, 3.9e-4 for Flower and 6.9e-4 for the engine's fused steps (batched kernels round
differently), 9e-6 for pfl. A row that trained one wrong client a round is off by far more
(and its accuracy check fails too)."""


class RowUnavailableError(RuntimeError):
    """A row cannot run on this machine (e.g. its framework is not installed); the table
    shows it as ``not run: <reason>`` instead of failing."""


@dataclass(frozen=True)
class CrossDeviceWorkload:
    """The benchmark's knobs (the CLI flags).

    Attributes
    ----------
    clients, per_round, rounds
        Clients the domain is split over, clients sampled per round
        (``strategy.fraction_fit = per_round / clients``), rounds.
    local_epochs, batch_size, lr, momentum, weight_decay
        Local training (plain SGD).
    actors
        Client actors of the engine and of Flower (``clients.num_cpus`` CPUs each).
    seed, alpha
        Run seed (partition, sampling, batches, initial weights) and Dirichlet
        concentration of the label skew.
    hidden_size
        The CNN's feature width (``model.hidden_size``).
    samples_per_client
        Cap each client's train split (the engine's seeded subsample,
        ``data.max_train_samples``; quick checks); ``None``: its whole partition.
    """

    clients: int = 1000
    per_round: int = 50
    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    actors: int = 2
    seed: int = 0
    alpha: float = 0.5
    hidden_size: int = 64
    samples_per_client: int | None = None

    def __post_init__(self) -> None:
        for name in ("clients", "per_round", "rounds", "local_epochs", "batch_size", "actors",
                     "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.samples_per_client is not None and self.samples_per_client < 1:
            raise ValueError(f"samples-per-client must be >= 1, got {self.samples_per_client}")
        if self.per_round > self.clients:
            raise ValueError(f"per-round ({self.per_round}) cannot exceed clients "
                             f"({self.clients})")
        if not self.lr > 0 or self.alpha <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("lr and alpha must be > 0, momentum and weight-decay >= 0")

    def experiment(self, data: Mapping[str, Any]) -> ExperimentConfig:
        """The experiment every row runs, on the ``data`` section given (its domain is split
        over :attr:`clients` clients with Dirichlet skew)."""
        gpu = torch.cuda.is_available()
        return resolve_paths(from_dict(ExperimentConfig, {
            "name": "bench-crossdevice", "seed": self.seed,
            "data": {"clients_per_domain": self.clients, "partition": "dirichlet",
                     "dirichlet_alpha": self.alpha,
                     "max_train_samples": self.samples_per_client, **data},
            # the ViT sizes do not apply to the CNN; num_heads only has to divide hidden_size
            "model": {"arch": "cnn", "hidden_size": self.hidden_size, "num_heads": 1},
            "train": {"local_epochs": self.local_epochs, "batch_size": self.batch_size,
                      "lr": self.lr, "optimizer": "sgd", "momentum": self.momentum,
                      "weight_decay": self.weight_decay, "precision": "fp32",
                      "channels_last": False},
            "clients": {"num_actors": self.actors, "num_cpus": 1.0,
                        "num_gpus": 1.0 / self.actors if gpu else 0.0,
                        "ready_timeout_s": 3600.0},
            "strategy": {"name": "fedavg", "rounds": self.rounds,
                         "fraction_fit": self.per_round / self.clients,
                         "min_fit_clients": self.per_round},
            "run": {"evaluate_every": 0, "checkpoint_every": self.rounds,
                    "keep_checkpoints": 1}}))

    def config(self, data_root: str | None = None, cache_dir: str | None = None
               ) -> ExperimentConfig:
        """The experiment on all of MedNIST (:func:`whole_mednist`, built once)."""
        entry = whole_mednist(data_root, cache_dir)
        return self.experiment({"domains": [DOMAIN], "extra_domains": {DOMAIN: entry},
                                "data_root": data_root, "cache_dir": cache_dir})


# -- data ------------------------------------------------------------------------------------
def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:12]


def whole_mednist(data_root: str | None = None, cache_dir: str | None = None
                  ) -> dict[str, Any]:
    """The ``data.extra_domains`` entry of all of MedNIST as one domain (:data:`DOMAIN`).

    The built-in ``mednist`` source gives half of MedNIST to the server's pool and lets a
    class belong to one domain only, so it cannot make a domain of all six classes. Here
    the engine's MedNIST loader (:func:`~engine.data.mednist.load_mednist`, the tarball or
    the extracted folder) decodes it once into a MedMNIST-layout ``.npz`` in the cache
    (train / val / test split :data:`SPLIT` per class, seed :data:`SPLIT_SEED`), read by the
    engine's ``npz`` source; its shards and partitions are then built and cached by the
    data plane like any domain's. The file's name carries a digest of the raw input, so a
    changed MedNIST gets a new file and new shards.

    Raises
    ------
    DataError
        When MedNIST is not under the data root.
    """
    root = resolve_data_root(data_root)
    folder, tarball = mednist_paths(root)
    if folder.is_dir():
        raw = files_fingerprint(folder, sorted(folder.glob("*/*.jpeg")))
    elif tarball.is_file():
        raw = file_fingerprint(tarball)
    else:
        list_mednist(root)  # raises the data plane's DataError saying where to put it
        raise DataError(f"MedNIST not found under {root}")  # (not reached)
    path = (resolve_cache_dir(cache_dir) / "bench-crossdevice"
            / f"mednist-whole-{_digest([raw, SPLIT, SPLIT_SEED])}.npz")
    if not path.exists():
        arrays = load_mednist(root, download=False)
        parts = stratified_take(arrays.labels, np.arange(len(arrays.labels)), SPLIT,
                                np.random.default_rng(SPLIT_SEED))
        logger.info("writing all of MedNIST (%d images) as one domain to %s",
                    len(arrays.labels), path)
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez_compressed(fh, **{f"{split}_{kind}": value for split, idx in
                                       zip(("train", "val", "test"), parts, strict=True)
                                       for kind, value in (("images", arrays.images[idx]),
                                                           ("labels", arrays.labels[idx, None]))})
    return {"source": "npz", "path": str(path), "label_names": list(MEDNIST_CLASSES),
            "task": "multi-class", "modality": "CT, MRI, X-ray",
            "body_part": "abdomen, breast, chest, hand, head"}


def build_shards(cfg: ExperimentConfig) -> tuple[list[ClientSpec], float, bool]:
    """Every client's spec with its shards built (once; cached by the data plane): the
    specs, the seconds it took and whether the partition was cached already."""
    (domain,) = cfg.data.domains
    builder = shard_builder(cfg.data)
    folder = (builder.domain_dir(domain) / f"{cfg.data.partition}-{cfg.data.clients_per_domain}"
              f"-s{cfg.seed}-a{cfg.data.dirichlet_alpha:g}")
    cached = (folder / PARTITION_COMPLETE).exists()
    started = time.perf_counter()
    specs = client_specs(cfg, pooled=False)
    return specs, time.perf_counter() - started, cached


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block, then restored (the
    harness's own small tensor work runs on one: two threads on two cores that the actors
    also use made the export 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- the export ------------------------------------------------------------------------------
@dataclass
class Exported:
    """The workload as the out-of-process rows read it (see the module docstring).

    ``x``, ``y`` are ``None`` once :meth:`drop_tensors` freed them."""

    folder: Path
    meta: dict[str, Any]
    init: State
    offsets: np.ndarray
    x: torch.Tensor | None
    y: torch.Tensor | None

    @property
    def cids(self) -> list[str]:
        """Engine client ids; the index is the partition id."""
        return list(self.meta["cids"])

    @property
    def sampled(self) -> list[list[int]]:
        """Partition ids trained per round (round ``r`` at ``r - 1``)."""
        return [list(s) for s in self.meta["sampled"]]

    def sizes(self) -> np.ndarray:
        """Train samples per partition."""
        return np.diff(self.offsets)

    def drop_tensors(self) -> None:
        """Free the training tensors (the files stay)."""
        self.x = self.y = None
        gc.collect()


def sampled_clients(cfg: ExperimentConfig, cids: Sequence[str]) -> list[list[str]]:
    """The clients that train in each round, as the engine samples them
    (:meth:`strategies.sampling.ClientSampling.fit` of ``strategy.fraction_fit`` and
    ``min_fit_clients``, seeded by the run seed and the round)."""
    sampling = cfg.strategy.sampling()
    return [sampling.fit(sorted(cids), seed=cfg.seed, server_round=r)
            for r in range(1, cfg.strategy.rounds + 1)]


def initial_state(cfg: ExperimentConfig, domain: str, num_classes: int) -> State:
    """The global model every row starts from: the engine's seeded initial encoder and the
    head a client initialises in its first round (``Client._load``'s fresh head)."""
    from engine.nn.models import build_model

    net = build_model(cfg.model, {})
    net.load_state_dict(initial_encoder(cfg), strict=False)
    net.add_head(domain, num_classes, seed=derive_seed(cfg.seed, "head", domain))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def export_workload(cfg: ExperimentConfig, specs: Sequence[ClientSpec], folder: Path
                    ) -> Exported:
    """Write the workload's export into ``folder`` (see the module docstring) and return
    it with the training tensors in memory."""
    (domain,) = cfg.data.domains
    builder = shard_builder(cfg.data)
    by_cid = {spec.cid: spec for spec in specs}
    cids = sorted(by_cid)
    xs, ys, num_classes = [], [], None
    for cid in cids:  # what Client.__init__ reads: the seeded cap, then Shard.tensors()
        path = by_cid[cid].resolve(cfg.data, builder).shards[domain]["train"]
        shard = read_split(path, "train", cfg.data.max_train_samples, cfg.seed)
        x, y = shard.tensors()
        assert y is not None, f"{path} has no labels"
        xs.append(x)
        ys.append(y.reshape(-1))
        num_classes = shard.meta.num_classes
    offsets = np.concatenate([[0], np.cumsum([len(y) for y in ys])]).astype(np.int64)
    x_all, y_all = torch.cat(xs), torch.cat(ys).to(torch.int64)
    del xs, ys
    index = {cid: i for i, cid in enumerate(cids)}
    sampled = [[index[c] for c in round_cids] for round_cids in sampled_clients(cfg, cids)]
    tc = cfg.train
    meta = {"cids": cids, "domain": domain, "num_classes": int(num_classes or 0),
            "rounds": cfg.strategy.rounds, "batch_size": tc.batch_size, "lr": tc.lr,
            "momentum": tc.momentum, "weight_decay": tc.weight_decay,
            "local_epochs": tc.local_epochs, "seed": cfg.seed, "sampled": sampled,
            "model": to_dict(cfg.model), "threads": max(1, int(cfg.clients.num_cpus))}
    init = initial_state(cfg, domain, int(num_classes or 0))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "train.npz") as tmp, tmp.open("wb") as fh:
        np.savez(fh, x=x_all.numpy(), y=y_all.numpy(), offsets=offsets)
    with atomic_path(folder / "init.pt") as tmp:
        torch.save(init, tmp)
    with atomic_path(folder / "workload.json") as tmp:  # last: a complete export has it
        tmp.write_text(json.dumps(meta, indent=1))
    return Exported(folder, meta, init, offsets, x_all, y_all)


def read_export(folder: Path | str) -> Exported:
    """An export written by :func:`export_workload`, tensors included."""
    folder = Path(folder)
    meta = json.loads((folder / "workload.json").read_text())
    with np.load(folder / "train.npz") as npz:
        x, y, offsets = npz["x"], npz["y"], npz["offsets"]
    init = torch.load(folder / "init.pt", weights_only=True)
    return Exported(folder, meta, init, offsets, torch.from_numpy(x), torch.from_numpy(y))


def build_network(meta: Mapping[str, Any]) -> Any:
    """The network of an export's ``workload.json`` (untrained; load ``init.pt`` into it)."""
    from engine.nn.models import build_model

    return build_model(from_dict(ModelConfig, meta["model"], "model"),
                       {meta["domain"]: int(meta["num_classes"])})


# -- rows ------------------------------------------------------------------------------------
@dataclass
class RowResult:
    """What one row measured.

    Attributes
    ----------
    name
        The row.
    wall_s
        From the row's start (Ray's start for the federated rows) to its last aggregation.
    startup_s
        The part of ``wall_s`` before the first round (Ray, actors, data loading).
    state
        The final global model.
    trained
        Partition ids that trained, per round (``None``: the row does not say).
    peak_rss, peak_pss
        Peak resident and proportional set bytes summed over every process of the row
        (:class:`~engine.bench.scale.MemoryPeak`; PSS shares a page among the processes
        that map it, RSS counts it in each; ``None``: not measured).
    detail
        Row-specific timings.
    status
        ``ok``, or ``not run: <reason>``.
    """

    name: str
    wall_s: float = 0.0
    startup_s: float = 0.0
    state: State | None = None
    trained: list[list[int]] | None = None
    peak_rss: int | None = None
    peak_pss: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"

    @property
    def rounds_s(self) -> float:
        """Time of the rounds alone."""
        return self.wall_s - self.startup_s


def run_sequential(exported: Exported, threads: int = 1) -> RowResult:
    """The compute floor: the plain training loop of the module docstring, in this process
    on ``threads`` threads (the training tensors of ``exported`` must be in memory)."""
    assert exported.x is not None and exported.y is not None, "the export's tensors are gone"
    meta = exported.meta
    domain, seed, cids = meta["domain"], int(meta["seed"]), exported.cids
    epochs, size = int(meta["local_epochs"]), int(meta["batch_size"])
    device = pick_device()
    x, y = exported.x.to(device), exported.y.to(device)
    offsets = exported.offsets.tolist()
    with torch_threads(threads), MemoryPeak() as memory:
        net = build_network(meta).to(device)
        net.load_state_dict(exported.init)
        params = dict(net.named_parameters())
        buffers = dict(net.named_buffers())
        global_state = {k: v.to(device) for k, v in exported.init.items()}
        # a process's first optimiser imports torch._dynamo (about 3 s on 2 busy cores):
        # an import, not compute, so the floor does not count it
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        started = time.perf_counter()
        for server_round, clients in enumerate(exported.sampled, start=1):
            sizes = [offsets[i + 1] - offsets[i] for i in clients]
            total = float(sum(sizes))
            acc = {k: torch.zeros_like(v, dtype=torch.float64)
                   for k, v in global_state.items()}
            for i, n in zip(clients, sizes, strict=True):
                with torch.no_grad():  # the global weights, loaded in place
                    for key, tensor in {**params, **buffers}.items():
                        tensor.copy_(global_state[key])
                xi, yi = x[offsets[i]:offsets[i + 1]], y[offsets[i]:offsets[i + 1]]
                generator = torch.Generator().manual_seed(
                    derive_seed(seed, server_round, cids[i]))
                optimizer = torch.optim.SGD(net.parameters(), lr=float(meta["lr"]),
                                            momentum=float(meta["momentum"]),
                                            weight_decay=float(meta["weight_decay"]))
                net.train()
                for _ in range(epochs):
                    for idx in epoch_batches(n, size, generator):
                        idx = idx.to(device)
                        loss = F.cross_entropy(net(xi[idx], domain), yi[idx])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                with torch.no_grad():
                    for key, tensor in net.state_dict().items():
                        acc[key] += tensor.to(torch.float64) * (n / total)
            global_state = {k: acc[k].to(v.dtype) for k, v in global_state.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return RowResult("sequential", wall_s=wall, state={k: v.cpu() for k, v in
                                                        global_state.items()},
                     trained=exported.sampled, peak_rss=memory.peak,
                     peak_pss=memory.peak_pss,
                     detail={"threads": max(1, threads), "device": str(device)})


class _LastRound(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by the bench's clock after the last aggregation: the engine's final
    federated evaluation of every client is not part of the workload (no row runs one;
    every row is scored by the one central evaluator)."""


def run_umim(cfg: ExperimentConfig, out: Path, name: str = "umim",
             cids: Sequence[str] | None = None) -> RowResult:
    """This engine on ``cfg``: Ray, the session's actors, the rounds; timed until the last
    aggregation. ``cids``: the export's order, to report the trained clients as partition
    ids (default: sorted client ids)."""
    import ray

    from engine.cluster.connect import connect_for
    from engine.fl.simulation import Callback, Simulation
    from engine.records.storage import Storage
    from engine.run.build import build_simulation
    from engine.run.session import Session

    marks: list[float] = []

    class Clock(Callback):
        def on_round_end(self, sim: Simulation, server_round: int) -> None:
            marks.append(time.perf_counter())
            if server_round == sim.rounds:
                raise _LastRound

    with MemoryPeak() as memory:
        started = time.perf_counter()
        fresh = not ray.is_initialized()
        connect_for(cfg)
        ray_s = time.perf_counter() - started
        session = Session(cfg).start()
        try:
            actors_s = time.perf_counter() - started - ray_s
            sim = build_simulation(cfg, Storage(out), session, callbacks=[Clock()])
            startup_s = time.perf_counter() - started
            described = session.actors.describe()  # (the harness: not timed)
            memory.pids = {d["pid"] for d in described}
            begin = time.perf_counter()
            with contextlib.suppress(_LastRound):
                sim.run()
            if len(marks) != sim.rounds:
                raise RuntimeError(f"{name}: {len(marks)} of {sim.rounds} rounds ran")
            rounds_s = marks[-1] - begin
            state = sim.strategy.client_state(sim.eval_cids[0])
            home = dict(session.actors.home)
        finally:
            session.shutdown()
            if fresh:
                ray.shutdown()
    index = {c: i for i, c in enumerate(cids if cids is not None else sorted(home))}
    trained: dict[int, list[int]] = {}
    per_actor: dict[tuple[int, int], float] = {}
    server: dict[tuple[int, str], float] = {}
    for r in sim.history.records:
        if r.phase == "fit" and r.metric == "train_seconds":
            trained.setdefault(r.round, []).append(index[r.client])
            key = (r.round, home[r.client])
            per_actor[key] = per_actor.get(key, 0.0) + r.value
        elif r.phase == "server":
            server[(r.round, r.metric)] = r.value
    rounds = range(1, sim.rounds + 1)
    fit = sum(server.get((r, "fit_seconds"), 0.0) for r in rounds)
    busiest = sum(max((v for (rr, _), v in per_actor.items() if rr == r), default=0.0)
                  for r in rounds)
    aggregate = sum(server.get((r, "aggregate_seconds"), 0.0) for r in rounds)
    checkpoint = sum(server.get((r, "checkpoint_seconds"), 0.0) for r in rounds)
    detail = {"ray_start_s": ray_s if fresh else 0.0, "actors_start_s": actors_s,
              "rounds_fit_s": fit, "busiest_actor_train_s": busiest,
              "dispatch_overhead_s": fit - busiest, "aggregate_s": aggregate,
              "checkpoint_s": checkpoint,
              # the round loop's own time besides dispatch, aggregation and the checkpoint
              "other_s": rounds_s - fit - aggregate - checkpoint,
              "actors": len(described),
              "clients_per_actor": max(len(d["clients"]) for d in described)}
    return RowResult(name, wall_s=startup_s + rounds_s, startup_s=startup_s, state=state,
                     trained=[sorted(trained.get(r, [])) for r in rounds],
                     peak_rss=memory.peak, peak_pss=memory.peak_pss, detail=detail)


def run_flower(cfg: ExperimentConfig, exported: Exported, out: Path,
               timeout_s: float = 3600) -> RowResult:
    """Flower's ``run_simulation`` on the export, in a child process that owns its own Ray
    (:mod:`engine.bench.crossdevice_flower`), with the engine's actors' resources."""
    res = cfg.clients
    actors = int(res.num_actors or 1)
    job = {"workload": str(exported.folder), "out": str(out), "num_cpus": res.num_cpus,
           "num_gpus": res.num_gpus, "actors": actors, "threads": max(1, int(res.num_cpus)),
           "timeout_s": timeout_s}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "engine.bench.crossdevice_flower",
                           json.dumps(job)], env=env, capture_output=True, text=True,
                          timeout=timeout_s + 600, check=False)
    result = out / "result.json"
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the Flower run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    done = json.loads(result.read_text())
    state = torch.load(out / "state.pt", weights_only=True)
    return RowResult("flower", wall_s=done["wall_s"], startup_s=done["startup_s"],
                     state=state, trained=done["trained"], peak_rss=done["peak_rss"],
                     peak_pss=done["peak_pss"],
                     detail={"query_s": done["query_s"], "errors": done["errors"]})


def run_pfl_row(exported: Exported, out: Path) -> RowResult:
    """The ``pfl`` row: ``engine.bench.crossdevice_pfl.run_pfl(workload_dir, out_dir) ->
    (wall_s, state)`` when that module is there. It may also write ``out_dir /
    "result.json"`` with ``startup_s``, ``peak_rss`` and ``peak_pss`` (bytes summed over its
    processes, see :class:`~engine.bench.scale.MemoryPeak`) and
    ``trained`` (partition ids per round), which the row then reports; else its memory is
    this process's tree while it runs. A module that cannot run here raises
    :class:`RowUnavailableError` (or fails to import): the row says ``not run: <reason>``."""
    try:
        if importlib.util.find_spec("engine.bench.crossdevice_pfl") is None:
            raise RowUnavailableError("engine/bench/crossdevice_pfl.py is not there")
        module = importlib.import_module("engine.bench.crossdevice_pfl")
        run_pfl = module.run_pfl
        with MemoryPeak() as memory:
            wall, state = run_pfl(exported.folder, out)
    except (RowUnavailableError, ImportError, AttributeError) as err:
        return RowResult("pfl", status=f"not run: {err}")
    extra = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() \
        else {}
    # memory from one source: the row's own figures, else this process tree's
    own = "peak_rss" in extra
    return RowResult("pfl", wall_s=float(wall), startup_s=float(extra.get("startup_s", 0.0)),
                     state={k: v.detach().cpu() for k, v in state.items()},
                     trained=extra.get("trained"),
                     peak_rss=int(extra["peak_rss"]) if own else memory.peak,
                     peak_pss=(int(extra["peak_pss"]) if "peak_pss" in extra else None)
                     if own else memory.peak_pss)


# -- scoring and the table -------------------------------------------------------------------
def max_abs_difference(a: State, b: State) -> float:
    """Largest absolute difference between the tensors of two states (``inf`` when their
    keys or shapes differ)."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()),
               default=0.0)


class CentralEvaluator:
    """The one scorer of every row: the engine's :class:`~engine.fl.client.Client` over the
    domain's whole test split (normalised with the domain's train statistics)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        (self.domain,) = cfg.data.domains
        spec = ClientSpec("evaluator", recipes=(ShardRecipe(self.domain),)).resolve(cfg.data)
        # (its train split is not used: one sample of it is kept, not 41k in memory)
        self.client = Client(spec, cfg.model, cfg.train, seed=cfg.seed, max_train_samples=1)

    def __call__(self, state: State) -> dict[str, float]:
        """``acc``, ``auc`` and ``loss`` of ``state`` on the test split."""
        return self.client.evaluate(EvaluateIns(state, "test")).metrics[self.domain]


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (_deep_merge(out[key], value) if isinstance(value, Mapping)
                    and isinstance(out.get(key), dict) else value)
    return out


def engine_config(cfg: ExperimentConfig, row: str) -> ExperimentConfig:
    """``cfg`` with the overrides of engine row ``row`` (:data:`ENGINE_ROWS`)."""
    overrides = ENGINE_ROWS[row]
    if not overrides:
        return cfg
    return resolve_paths(from_dict(ExperimentConfig, _deep_merge(to_dict(cfg), overrides)))


def check_rows(rows: Sequence[RowResult], sampled: list[list[int]], scores: Mapping[str, float],
               acc_tolerance: float, state_tolerance: float) -> tuple[dict[str, float], list[str]]:
    """Each row's max |difference| from the sequential row, and what fails the comparison
    (wrong clients trained, accuracy or state beyond tolerance)."""
    ran = [r for r in rows if r.status == "ok"]
    failures: list[str] = []
    for row in ran:
        if row.trained is not None and row.trained != sampled:
            wrong = [r for r in range(1, max(len(row.trained), len(sampled)) + 1)
                     if row.trained[r - 1:r] != sampled[r - 1:r]]
            failures.append(f"{row.name} trained other clients than the sampled ones "
                            f"(round {wrong[0]})")
    reference = next((r for r in ran if r.name == "sequential"), None)
    diffs: dict[str, float] = {}
    if reference is None or reference.state is None:
        return diffs, failures
    for row in ran:
        assert row.state is not None
        diffs[row.name] = max_abs_difference(row.state, reference.state)
        if row is reference:
            continue
        if not diffs[row.name] <= state_tolerance:
            failures.append(f"{row.name}'s final weights differ from sequential's by "
                            f"{diffs[row.name]:.3g} > {state_tolerance:g}")
        gap = abs(scores[row.name] - scores[reference.name])
        if not gap <= acc_tolerance:
            failures.append(f"{row.name}'s test accuracy {scores[row.name]:.4f} differs from "
                            f"sequential's {scores[reference.name]:.4f} by more than "
                            f"{acc_tolerance:g}")
    return diffs, failures


def table_rows(rows: Sequence[RowResult], sampled: list[list[int]], scores: Mapping[str, float],
               diffs: Mapping[str, float]) -> list[dict[str, Any]]:
    """The printed rows: rates of the rounds, overhead per update, memory, accuracy."""
    by = {r.name: r for r in rows if r.status == "ok"}
    floor = by.get("sequential")
    rounds, updates = len(sampled), sum(map(len, sampled))
    out = []
    for row in rows:
        if row.status != "ok":
            result, _, reason = row.status.partition(": ")
            out.append({"method": row.name, "result": result, "reason": reason})
            continue
        rounds_s = row.rounds_s
        item: dict[str, Any] = {
            "method": row.name, "result": "ok", "wall_s": row.wall_s,
            "startup_s": row.startup_s, "rounds_s": rounds_s,
            "rounds_per_s": rounds / rounds_s, "updates_per_s": updates / rounds_s,
            "overhead_ms_per_update": ((rounds_s - floor.rounds_s) / updates * 1e3
                                       if floor is not None else None),
            "peak_rss_gb": row.peak_rss / 1024**3 if row.peak_rss is not None else None,
            "peak_pss_gb": row.peak_pss / 1024**3 if row.peak_pss is not None else None,
            "test_acc": scores.get(row.name), "max_abs_diff": diffs.get(row.name),
            "same_clients": None if row.trained is None else row.trained == sampled,
            **{k: v for k, v in row.detail.items()}}
        for other in ("flower", "pfl"):
            if other in by and other != row.name:
                item[f"x_{other}"] = (rounds / rounds_s) / (rounds / by[other].rounds_s)
        out.append(item)
    return out


def bench_crossdevice(workload: CrossDeviceWorkload, *, rows: Sequence[str] = ROWS,
                      data_root: str | None = None, cache_dir: str | None = None,
                      export_dir: str | None = None, acc_tolerance: float = ACC_TOLERANCE,
                      state_tolerance: float = STATE_TOLERANCE) -> dict[str, Any]:
    """Run the workload with each of ``rows`` and compare them (see the module docstring).

    Parameters
    ----------
    workload
        The knobs.
    rows
        Names from :data:`ROWS` and :data:`ENGINE_ROWS`, run in this order.
    data_root, cache_dir
        Where MedNIST is and where the shards go.
    export_dir
        Keep the export there (default: a temporary folder, removed after).
    acc_tolerance, state_tolerance
        The agreement the comparison demands of each row with the sequential row.

    Returns
    -------
    dict
        ``rows`` (one dict per row), ``passed``, ``failures``, ``sampled`` (partition ids per
        round), the tolerances, the data timings and the workload.
    """
    known = [*ROWS, *ENGINE_ROWS]
    unknown = [r for r in rows if r not in known]
    if unknown or not rows or len(set(rows)) != len(rows):
        raise ValueError(f"rows: unknown or repeated {unknown or list(rows)}; known: {known}")
    cfg = workload.config(data_root, cache_dir)
    specs, shards_s, cached = build_shards(cfg)
    results: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="umim-crossdevice-") as tmp:
        folder = Path(export_dir) if export_dir else Path(tmp) / "workload"
        started = time.perf_counter()
        with torch_threads(1):
            exported = export_workload(cfg, specs, folder)
        export_s = time.perf_counter() - started
        threads = max(1, int(cfg.clients.num_cpus))
        for i, name in enumerate(rows):
            logger.info("bench crossdevice: %s", name)
            out = Path(tmp) / name
            out.mkdir()
            if "sequential" not in rows[i:]:  # the other rows read the files
                exported.drop_tensors()
            if name == "sequential":
                results.append(run_sequential(exported, threads))
            elif name in ENGINE_ROWS:
                results.append(run_umim(engine_config(cfg, name), out, name, exported.cids))
            elif name == "flower":
                results.append(run_flower(cfg, exported, out))
            else:
                results.append(run_pfl_row(exported, out))
        exported.drop_tensors()
        with torch_threads(1):
            evaluator = CentralEvaluator(cfg)
            scores = {r.name: float(evaluator(r.state)["acc"]) for r in results
                      if r.status == "ok" and r.state is not None}
    sampled = exported.sampled
    updates = sum(map(len, sampled))
    diffs, failures = check_rows(results, sampled, scores, acc_tolerance, state_tolerance)
    return {"rows": table_rows(results, sampled, scores, diffs),
            "passed": not failures, "failures": failures, "updates": updates,
            "acc_tolerance": acc_tolerance, "state_tolerance": state_tolerance,
            "sampled": sampled,
            "data": {"shards_s": shards_s, "shards_cached": cached, "export_s": export_s,
                     "train_samples": int(exported.offsets[-1])},
            "workload": {**asdict(workload), "sequential_threads": threads}}


def bench_crossdevice_scale(workload: CrossDeviceWorkload, *, data_root: str | None = None,
                            cache_dir: str | None = None) -> dict[str, Any]:
    """The engine alone with many virtual clients on few actors (e.g. 10,000 on 2): the
    time to build (or find) the shards, the start-up (Ray, the actors loading every
    client's shards), seconds per round with ``per_round`` sampled clients, and the peak
    resident memory summed over every process from the first shard to the last round (the
    ``umim`` row's engine path)."""
    cfg = engine_config(workload.config(data_root, cache_dir), "umim")
    with MemoryPeak() as memory, tempfile.TemporaryDirectory(prefix="umim-xd-scale-") as tmp:
        _, shards_s, cached = build_shards(cfg)
        row = run_umim(cfg, Path(tmp))
    per_round = row.rounds_s / cfg.strategy.rounds
    return {"rows": [{"clients": workload.clients, "actors": row.detail["actors"],
                      "clients_per_actor": row.detail["clients_per_actor"],
                      "per_round": workload.per_round, "rounds": workload.rounds,
                      "shards_s": shards_s, "shards_cached": cached,
                      "startup_s": row.startup_s, "ray_start_s": row.detail["ray_start_s"],
                      "actors_start_s": row.detail["actors_start_s"],
                      "seconds_per_round": per_round, "rounds_per_s": 1.0 / per_round,
                      "updates_per_s": workload.per_round / per_round,
                      "peak_rss_gb": max(memory.peak, row.peak_rss or 0) / 1024**3,
                      "peak_pss_gb": max(memory.peak_pss, row.peak_pss or 0) / 1024**3}],
            "workload": asdict(workload)}
