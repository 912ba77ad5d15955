"""``umim bench fedavg``: one FedAvg workload three ways, back to back.

1. ``sequential``: one process, a plain loop of PyTorch training over the clients (the
   compute floor on one device);
2. ``engine``: this engine (client actors, object store, FedAvg strategy);
3. ``flower``: Flower 1.42 ``run_simulation`` on its Ray backend with a ``ClientApp``
   written as Flower's PyTorch quickstart writes one (:mod:`engine.bench.flower_tutorial`:
   model built per round, ``DataLoader`` with per-sample normalisation), the same model,
   data, optimiser and batches, and the same resources per client actor: what a user would
   otherwise pick;
4. ``flower-resident``: Flower's ``run_simulation`` driving the engine's own resident
   ``Client`` through :mod:`engine.interop.flower` (Flower's orchestration cost alone);
5. ``ceiling``: the device's throughput ceiling for this model: one process, one model,
   every client's training images as one set, batch 2048, channels-last, and bf16 autocast
   and ``torch.compile`` on CUDA (float32 eager on CPU, where compiling was slower: 17.4
   vs 20.4 samples/s per thread, after 46-75 s of compiling); autocast as
   ``train.precision`` says, like every method (:mod:`engine.nn.precision`);
   it trains the same number of samples but is not federated, so it is timed, not scored.

Reference workload: PneumoniaMNIST split IID over the clients, MONAI ResNet-18 adapted to
28 x 28 (3x3 stride-1 stem, no max-pool), SGD, channels-last, bf16 autocast on CUDA.
The federated methods start from the same weights, see the same batches, and are scored by
the same evaluator on the full PneumoniaMNIST test split; the command checks that they agree.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import ExperimentConfig, from_dict, to_dict
from engine.data.prepare import ShardRecipe
from engine.data.shards import Shard
from engine.fl.client import Client, ClientSpec, derive_seed, read_split, shard_builder
from engine.run.session import client_specs, initial_encoder, resolve_paths
from strategies import create_strategy
from strategies.types import EvaluateIns, FitRes, State

logger = logging.getLogger(__name__)
DOMAIN = "pneumonia"
METHODS = ("sequential", "engine", "flower", "flower-resident", "ceiling")
FLOWER_STYLES = {"flower": "tutorial", "flower-resident": "resident"}


@dataclass(frozen=True)
class FedAvgWorkload:
    """The benchmark's knobs (the CLI flags)."""

    clients: int = 8
    rounds: int = 2
    local_epochs: int = 1
    batch_size: int = 128
    samples_per_client: int | None = None
    arch: str = "resnet18"
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    lr: float = 0.01
    seed: int = 0
    precision: str = "auto"

    def config(self, data_root: str | None, cache_dir: str | None) -> ExperimentConfig:
        """The experiment every method runs."""
        gpu = torch.cuda.is_available()
        cores = os.cpu_count() or 1
        actors = self.actors or (self.clients if gpu else min(self.clients, cores))
        cpus = self.cpus_per_actor or (max(cores // actors, 1) if not gpu else 1.0)
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (
            1.0 / actors if gpu else 0.0)
        data = {"domains": [DOMAIN], "clients_per_domain": self.clients, "partition": "iid",
                "max_train_samples": self.samples_per_client, "max_eval_samples": 64,
                "data_root": data_root, "cache_dir": cache_dir}
        return resolve_paths(from_dict(ExperimentConfig, {
            "name": "bench-fedavg", "seed": self.seed, "data": data,
            "model": {"arch": self.arch, "hidden_size": 32, "mlp_dim": 64, "num_layers": 1,
                      "num_heads": 2},
            "train": {"local_epochs": self.local_epochs, "batch_size": self.batch_size,
                      "lr": self.lr, "optimizer": "sgd", "momentum": 0.9,
                      "weight_decay": 0.0, "precision": self.precision},
            "clients": {"num_actors": actors, "num_cpus": float(cpus),
                        "num_gpus": float(gpus)},
            "strategy": {"name": "fedavg", "rounds": self.rounds},
            "run": {"evaluate_every": 0, "checkpoint_every": self.rounds,
                    "keep_checkpoints": 1}}))


def initial_state(cfg: ExperimentConfig) -> State:
    """The global model every method starts from: the seeded encoder and the pneumonia head
    every client would initialise itself (see ``Client._load``)."""
    from engine.nn.models import build_model

    net = build_model(cfg.model, {})
    net.load_state_dict(initial_encoder(cfg), strict=False)
    net.add_head(DOMAIN, 2, seed=derive_seed(cfg.seed, "head", DOMAIN))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def train_shards(cfg: ExperimentConfig, specs: Sequence[ClientSpec], domain: str = DOMAIN
                 ) -> list[Shard]:
    """Each client's ``domain`` train split with the experiment's seeded cap: the very
    samples an engine :class:`~engine.fl.client.Client` of the same spec trains on."""
    builder = shard_builder(cfg.data)
    return [read_split(spec.resolve(cfg.data, builder).shards[domain]["train"], "train",
                       cfg.data.max_train_samples, cfg.seed) for spec in specs]


def run_sequential(cfg: ExperimentConfig, specs: list[ClientSpec]) -> tuple[float, State]:
    """Plain PyTorch: every client trained in turn in this process, then averaged."""
    started = time.perf_counter()
    models: dict[tuple, Any] = {}
    clients = {s.cid: Client(s.resolve(cfg.data), cfg.model, cfg.train, seed=cfg.seed,
                             max_train_samples=cfg.data.max_train_samples,
                             max_eval_samples=cfg.data.max_eval_samples, models=models)
               for s in specs}
    strategy = create_strategy("fedavg")
    strategy.initialize([c.info() for c in clients.values()], initial_encoder(cfg))
    for server_round in range(1, cfg.strategy.rounds + 1):
        results: dict[str, FitRes] = {}
        for cid, ins in strategy.configure_fit(server_round, sorted(clients)).items():
            ins.config = {**ins.config, "round": server_round, "seed": cfg.seed}
            results[cid] = clients[cid].fit(ins)
        strategy.aggregate_fit(server_round, results, {})
    wall = time.perf_counter() - started
    return wall, strategy.client_state(sorted(clients)[0])


def run_ceiling(cfg: ExperimentConfig, shards: Sequence[Shard], samples: int,
                batch_size: int = 2048) -> float:
    """The ceiling: ``samples`` training samples through one model in big batches; returns
    the time those samples take at the rate of the timed steps (whole batches, after two
    untimed warm-up steps that compile)."""
    from engine.fl.client import pick_device
    from engine.nn.models import build_model
    from engine.nn.precision import autocast

    device = pick_device()
    gpu = device.type == "cuda"
    tensors = [shard.tensors() for shard in shards]
    x = torch.cat([t[0] for t in tensors]).to(device, memory_format=torch.channels_last)
    y = torch.cat([t[1] for t in tensors]).reshape(-1).to(device)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, {DOMAIN: 2}).to(device, memory_format=torch.channels_last)
    forward = torch.compile(net) if gpu else net
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.train.lr,
                                momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = min(batch_size, len(x))
    steps = max(1, -(-samples // batch))

    def step() -> None:
        idx = torch.randint(len(x), (batch,), generator=generator).to(device)
        with autocast(cfg.train.precision, device):
            logits = forward(x[idx], DOMAIN)
        loss = F.cross_entropy(logits.float(), y[idx])  # PneumoniaMNIST: binary
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * samples / (steps * batch)


def run_engine(cfg: ExperimentConfig, out: Path) -> tuple[float, State, dict[str, float]]:
    """This engine: Ray init, client actors, rounds; timed until the last aggregation.

    Also returns where the time went: Ray start, actor start (imports, shard loading),
    and per round the clients' own training time against the dispatch-to-last-result
    time, aggregation and checkpointing.
    """
    import ray

    from engine.cluster.connect import connect_for
    from engine.fl.simulation import Callback, Simulation
    from engine.records.storage import Storage
    from engine.run.build import build_simulation
    from engine.run.session import Session

    marks: dict[str, float] = {}

    class Clock(Callback):
        def on_round_end(self, sim: Simulation, server_round: int) -> None:
            marks["end"] = time.perf_counter()

    started = time.perf_counter()
    fresh = not ray.is_initialized()
    connect_for(cfg)
    ray_s = time.perf_counter() - started
    session = Session(cfg).start()
    session_s = time.perf_counter() - started - ray_s
    try:
        sim = build_simulation(cfg, Storage(out), session, callbacks=[Clock()])
        result = sim.run()  # the clock stops at the last round, before the test pass
        state = sim.strategy.client_state(sim.eval_cids[0])
        assert result.summary["rounds"] == cfg.strategy.rounds
        home = session.actors.home
    finally:
        session.shutdown()
    server = {(r.round, r.metric): r.value for r in sim.history.records if r.phase == "server"}
    per_actor: dict[tuple[int, int], float] = {}
    for r in sim.history.records:
        if r.phase == "fit" and r.metric == "train_seconds":
            key = (r.round, home[r.client])
            per_actor[key] = per_actor.get(key, 0.0) + r.value
    rounds = range(1, cfg.strategy.rounds + 1)
    fit = sum(server[(r, "fit_seconds")] for r in rounds)
    busiest = sum(max(v for (rr, _), v in per_actor.items() if rr == r) for r in rounds)
    breakdown = {"ray_start_s": ray_s if fresh else 0.0, "actors_start_s": session_s,
                 "rounds_fit_s": fit, "busiest_actor_train_s": busiest,
                 "dispatch_overhead_s": fit - busiest,
                 "aggregate_s": sum(server.get((r, "aggregate_seconds"), 0.0) for r in rounds),
                 "checkpoint_s": sum(server.get((r, "checkpoint_seconds"), 0.0)
                                     for r in rounds)}
    return marks["end"] - started, state, breakdown


def run_flower(cfg: ExperimentConfig, out: Path, style: str = "tutorial",
               timeout_s: float = 3600) -> tuple[float, State]:
    """Flower's ``run_simulation`` in a child process (it owns Ray while it runs), with the
    ``tutorial`` or the ``resident`` client (see :mod:`engine.bench.flower_child`)."""
    job = {"config": to_dict(cfg), "out": str(out), "style": style}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "engine.bench.flower_child", json.dumps(job)],
                          env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    result = out / "result.json"
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the Flower run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    wall = json.loads(result.read_text())["wall_s"]
    state = torch.load(out / "state.pt", weights_only=True)
    return wall, state


def score(cfg: ExperimentConfig, state: State) -> dict[str, float]:
    """Test AUC / ACC of a global model on the full PneumoniaMNIST test split."""
    spec = ClientSpec("evaluator", recipes=(ShardRecipe(DOMAIN),)).resolve(cfg.data)
    evaluator = Client(spec, cfg.model, cfg.train, seed=cfg.seed)
    return evaluator.evaluate(EvaluateIns(state, "test")).metrics[DOMAIN]


def _max_difference(a: State, b: State) -> float:
    """Largest absolute difference between the float tensors of two states, relative to the
    tensor's own scale (max |b| of that tensor, at least 1): BatchNorm's running variances
    are in the hundreds, so absolute differences alone would say little."""
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point() and value.numel():
            ref = b[key].float()
            scale = max(float(ref.abs().max()), 1.0)
            worst = max(worst, float((value.float() - ref).abs().max()) / scale)
    return worst


def bench_fedavg(workload: FedAvgWorkload, *, data_root: str | None = None,
                 cache_dir: str | None = None, methods: tuple[str, ...] = METHODS,
                 tolerance: float = 0.03) -> dict[str, Any]:
    """Run the workload with each method and compare; returns rows and the check."""
    cfg = workload.config(data_root, cache_dir)
    specs = client_specs(cfg, pooled=False)
    shards = train_shards(cfg, specs)
    samples = sum(map(len, shards)) * cfg.train.local_epochs * cfg.strategy.rounds
    rows: list[dict[str, Any]] = []
    states: dict[str, State] = {}
    breakdown: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            logger.info("bench fedavg: %s", method)
            if method == "sequential":
                wall, state = run_sequential(cfg, specs)
            elif method == "engine":
                wall, state, breakdown = run_engine(cfg, Path(tmp) / "engine")
            elif method in FLOWER_STYLES:
                (Path(tmp) / method).mkdir()
                wall, state = run_flower(cfg, Path(tmp) / method, FLOWER_STYLES[method])
            elif method == "ceiling":
                wall = run_ceiling(cfg, shards, samples)
                rows.append({"method": method, "wall_s": wall, "samples": samples,
                             "samples_per_s": samples / wall})
                continue
            else:
                raise ValueError(f"unknown method {method!r}; use {METHODS}")
            states[method] = state
            metrics = score(cfg, state)
            rows.append({"method": method, "wall_s": wall, "samples": samples,
                         "samples_per_s": samples / wall, "test_acc": metrics["acc"],
                         "test_auc": metrics["auc"]})
    base = rows[0]
    for row in rows:
        row["time_vs_" + base["method"]] = row["wall_s"] / base["wall_s"]
    by = {r["method"]: r for r in rows}
    for flower in FLOWER_STYLES:
        if flower in by and "engine" in by:
            key = "speedup_vs_" + flower.replace("-", "_")
            by["engine"][key] = by[flower]["wall_s"] / by["engine"]["wall_s"]
    if "ceiling" in by:
        for row in rows:
            row["of_ceiling"] = row["samples_per_s"] / by["ceiling"]["samples_per_s"]
    accs = [r["test_acc"] for r in rows if "test_acc" in r]
    # None: fewer than two scored methods, nothing to compare
    agree = max(accs) - min(accs) <= tolerance if len(accs) > 1 else None
    # how far each final model is from the first trained method's
    reference = next(iter(states), None)
    diffs = ({m: _max_difference(st, states[reference]) for m, st in states.items()}
             if reference is not None else {})
    for row in rows:
        if row["method"] in diffs:
            row[f"weight_diff_vs_{reference}"] = diffs[row["method"]]
    return {"rows": rows, "accuracy_agrees": agree, "tolerance": tolerance,
            "engine_breakdown": breakdown, "weight_reference": reference,
            "max_weight_difference": max(diffs.values(), default=0.0),
            "workload": {**workload.__dict__, "actors": cfg.clients.num_actors,
                         "cpus_per_actor": cfg.clients.num_cpus,
                         "gpus_per_actor": cfg.clients.num_gpus}}
