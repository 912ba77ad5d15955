"""The one round loop: client actors, strategies, federated evaluation, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from engine.client import ClientSpec, derive_seed
from engine.config import ExperimentConfig, from_dict, to_dict
from engine.data import ShardBuilder, domain_catalog, resolve_cache_dir, resolve_data_root
from engine.data.prepare import MedNISTSplitSettings
from engine.history import History
from engine.models import build_model
from engine.progress import RunProgress
from engine.storage import Storage
from strategies import Strategy, create_strategy, nonfinite_keys
from strategies.centralised import POOLED_CID
from strategies.types import EvaluateRes, FitRes

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run cannot go on (too many clients failed, a pooled client failed, ...)."""


@dataclass
class RunResult:
    """What a finished run returns (and wrote to ``run_dir``)."""

    run_dir: str
    config: ExperimentConfig
    history: History
    summary: dict[str, Any]
    strategy_state: dict[str, Any]


class Callback:
    """Hooks into the round loop (for tests, logging, chaos experiments)."""

    def on_tasks_submitted(self, sim: Simulation, phase: str, server_round: int) -> None:
        """Called right after a round's ``fit`` or ``evaluate`` tasks were submitted."""

    def on_round_end(self, sim: Simulation, server_round: int) -> None:
        """Called after a round was aggregated, evaluated and checkpointed."""


def resolve_paths(cfg: ExperimentConfig, data_root: str | None = None,
                  cache_dir: str | None = None) -> ExperimentConfig:
    """Fix the data root and cache folder to absolute paths, so the saved config replays."""
    data = replace(cfg.data,
                   data_root=str(resolve_data_root(data_root or cfg.data.data_root)),
                   cache_dir=str(resolve_cache_dir(cache_dir or cfg.data.cache_dir)))
    return replace(cfg, data=data)


def client_specs(cfg: ExperimentConfig, pooled: bool) -> tuple[list[ClientSpec], ClientSpec | None]:
    """Build (once) the shards of every client, and the pooled oracle client if asked."""
    catalog = domain_catalog(dict(cfg.data.extra_domains))
    unknown = [d for d in cfg.data.domains if d not in catalog]
    if unknown:
        raise ValueError(f"data.domains: unknown domain(s) {unknown}; known: {list(catalog)}")
    builder = ShardBuilder(catalog, Path(cfg.data.data_root or ""), Path(cfg.data.cache_dir or ""),
                           mednist=MedNISTSplitSettings(seed=cfg.data.mednist_seed),
                           download=cfg.data.download)
    specs: list[ClientSpec] = []
    for domain in cfg.data.domains:
        if cfg.data.clients_per_domain == 1:
            paths = [builder.domain(domain)]
            cids = [domain]
        else:
            paths = builder.partitions(domain, cfg.data.clients_per_domain,
                                       scheme=cfg.data.partition, seed=cfg.seed,
                                       alpha=cfg.data.dirichlet_alpha)
            cids = [f"{domain}#{i}" for i in range(len(paths))]
        specs += [ClientSpec(cid, {domain: {s: str(p) for s, p in ps.items()}})
                  for cid, ps in zip(cids, paths, strict=True)]
    pooled_spec = None
    if pooled:
        pooled_spec = ClientSpec(POOLED_CID, {d: {s: str(p) for s, p in builder.domain(d).items()}
                                              for d in cfg.data.domains})
    return specs, pooled_spec


def initial_encoder(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The random initial global encoder, reproducible from ``cfg.seed``."""
    torch.manual_seed(derive_seed(cfg.seed, "initial-encoder"))
    model = build_model(cfg.model, {})
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith("encoder.")}


class Simulation:
    """Runs one experiment on a pool of client actors.

    Parameters
    ----------
    cfg
        The experiment (paths already resolved, see :func:`resolve_paths`).
    storage
        The run directory.
    quiet
        Hide the progress display.
    callbacks
        Hooks into the round loop.
    """

    def __init__(self, cfg: ExperimentConfig, storage: Storage, *, quiet: bool = False,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.storage = storage
        self.quiet = quiet
        self.callbacks = list(callbacks)
        self.history = History()
        self.strategy: Strategy = create_strategy(cfg.strategy.name, to_dict(cfg.strategy))
        self.pool: Any = None  # engine.pool.ActorPool, created in start()
        self.failures: list[dict[str, Any]] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Build shards, check resources, start the actors and onboard the clients."""
        from engine.pool import ActorPool

        specs, pooled = client_specs(self.cfg, self.strategy.pooled)
        self.eval_cids = [s.cid for s in specs]
        self.fit_cids = [POOLED_CID] if pooled else list(self.eval_cids)
        self.pool = ActorPool.start(self.cfg, specs + ([pooled] if pooled else []))
        infos = self.pool.infos()
        self.strategy.initialize([infos[c] for c in self.fit_cids + self.eval_cids
                                  if c in infos], initial_encoder(self.cfg))

    def shutdown(self) -> None:
        """Stop the actors."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    # -- the loop --------------------------------------------------------------------------
    def run(self, start_round: int = 1) -> RunResult:
        """Run rounds ``start_round .. strategy.rounds``, then the final test evaluation."""
        rounds = self.cfg.strategy.rounds
        with RunProgress(rounds, len(self.fit_cids), disable=self.quiet) as progress:
            progress.advance_rounds(start_round - 1)
            for server_round in range(start_round, rounds + 1):
                self._fit_round(server_round, progress)
                self._evaluate(server_round, "val", progress)
                if server_round % self.cfg.run.checkpoint_every == 0 or server_round == rounds:
                    save_checkpoint(self.storage, Checkpoint(server_round,
                                                             self.strategy.state_dict(),
                                                             self.history),
                                    keep=self.cfg.run.keep_checkpoints)
                self._write_history()
                progress.advance_rounds(1)
                for cb in self.callbacks:
                    cb.on_round_end(self, server_round)
            self._evaluate(rounds, "test", progress)
        self._write_history()
        summary = self._summary()
        self.storage.write_text("summary.json", json.dumps(summary, indent=2))
        return RunResult(self.storage.uri, self.cfg, self.history, summary,
                         self.strategy.state_dict())

    def _fit_round(self, server_round: int, progress: RunProgress) -> None:
        instructions = self.strategy.configure_fit(server_round, self.fit_cids)
        for ins in instructions.values():
            ins.config = {**ins.config, "round": server_round, "seed": self.cfg.seed}
        progress.start_phase(f"round {server_round} fit", len(instructions))
        started = time.perf_counter()
        results, failures = self.pool.run("fit", instructions, progress,
                                          lambda: self._notify("fit", server_round))
        seconds = time.perf_counter() - started
        valid: dict[str, FitRes] = {}
        for cid in sorted(results):
            res = results[cid]
            bad = nonfinite_keys(res.state)
            if bad:
                failures[cid] = f"non-finite update (NaN/Inf in {bad[:3]})"
                self._record_failure(server_round, cid, "nonfinite_update", failures[cid])
                continue
            valid[cid] = res
            self.history.add(server_round, cid, "fit", res.metrics)
        for cid, reason in failures.items():
            if cid in results:
                continue
            kind = "actor_died" if "actor" in reason.lower() else "task_error"
            self._record_failure(server_round, cid, kind, reason)
        needed = math.ceil(self.cfg.clients.min_fit_fraction * len(instructions))
        if len(valid) < needed:
            raise RunError(f"round {server_round}: only {len(valid)} of {len(instructions)} "
                           f"clients returned a valid update, {needed} needed "
                           f"(clients.min_fit_fraction={self.cfg.clients.min_fit_fraction}); "
                           f"failures: {failures}")
        server_metrics = self.strategy.aggregate_fit(server_round, valid, failures)
        samples = sum(r.num_examples for r in valid.values()) * self.cfg.train.local_epochs
        server_metrics = {**server_metrics, "fit_seconds": seconds,
                          "fit_samples_per_s": samples / max(seconds, 1e-9)}
        self.history.add(server_round, "", "server", server_metrics)

    def _evaluate(self, server_round: int, split: str, progress: RunProgress) -> None:
        instructions = self.strategy.configure_evaluate(server_round, self.eval_cids, split)
        progress.start_phase(f"round {server_round} {split}", len(instructions))
        results, failures = self.pool.run("evaluate", instructions, progress,
                                          lambda: self._notify("evaluate", server_round))
        for cid in sorted(results):
            res: EvaluateRes = results[cid]
            for domain, metrics in res.metrics.items():
                self.history.add(server_round, cid, split, metrics, domain=domain)
        for cid, reason in failures.items():
            self._record_failure(server_round, cid, f"{split}_failed", reason)

    # -- bookkeeping -----------------------------------------------------------------------
    def _notify(self, phase: str, server_round: int) -> None:
        for cb in self.callbacks:
            cb.on_tasks_submitted(self, phase, server_round)

    def _record_failure(self, server_round: int, cid: str, kind: str, reason: str) -> None:
        logger.warning("round %d: client %s %s: %s", server_round, cid, kind, reason)
        self.history.add(server_round, cid, "failure", {kind: 1.0})
        self.failures.append({"round": server_round, "client": cid, "kind": kind,
                              "reason": reason[:2000]})

    def _write_history(self) -> None:
        self.storage.write_bytes("history.parquet", self.history.to_parquet_bytes())

    def _summary(self) -> dict[str, Any]:
        test = {m: self.history.latest("test", m) for m in ("auc", "acc")}
        domains: dict[str, dict[str, float]] = {}
        for domain in self.cfg.data.domains:
            row = {}
            for metric, values in test.items():
                vals = [v for (_, d), v in values.items() if d == domain]
                row[metric] = sum(vals) / len(vals) if vals else math.nan
            domains[domain] = row
        aucs = [r["auc"] for r in domains.values() if not math.isnan(r["auc"])]
        throughput = [r.value for r in self.history.records
                      if r.phase == "server" and r.metric == "fit_samples_per_s"]
        return {"name": self.cfg.name, "strategy": self.cfg.strategy.name,
                "rounds": self.cfg.strategy.rounds, "domains": domains,
                "mean_test_auc": sum(aucs) / len(aucs) if aucs else math.nan,
                "fit_samples_per_s": sum(throughput) / len(throughput) if throughput else None,
                "failures": self.failures}


# -- the public API --------------------------------------------------------------------------
def _run_dir(cfg: ExperimentConfig, out: str | os.PathLike[str] | None) -> Storage:
    if out is not None:
        return Storage(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = cfg.run.storage_path.rstrip("/")
    return Storage(f"{base}/{cfg.name}-{stamp}")


def run(cfg: ExperimentConfig, *, out: str | os.PathLike[str] | None = None,
        data_root: str | None = None, quiet: bool = False,
        callbacks: Sequence[Callback] = ()) -> RunResult:
    """Run an experiment end to end and write its run directory.

    Parameters
    ----------
    cfg
        The experiment config (see :func:`engine.config.load_config`).
    out
        Run directory (local path or pyarrow URI); default
        ``<run.storage_path>/<name>-<timestamp>``.
    data_root
        Overrides ``data.data_root``.
    quiet
        No progress display.
    callbacks
        Hooks into the round loop.

    Returns
    -------
    RunResult
        Run directory, history, summary and the final strategy state.
    """
    from engine.cluster import connect

    cfg = resolve_paths(cfg, data_root)
    storage = _run_dir(cfg, out)
    if storage.exists("config.yaml"):
        raise RunError(f"{storage.uri} already holds a run; use `umim resume {storage.uri}`")
    connect(cfg.run.address)
    sim = Simulation(cfg, storage, quiet=quiet, callbacks=callbacks)
    try:
        sim.start()
        storage.write_text("config.yaml", _yaml(cfg))
        return sim.run()
    finally:
        sim.shutdown()


def resume(run_dir: str | os.PathLike[str], *, quiet: bool = False,
           callbacks: Sequence[Callback] = ()) -> RunResult:
    """Continue a run from its newest complete checkpoint (or from scratch if it has none)."""
    from engine.cluster import connect

    storage = Storage(run_dir)
    if not storage.exists("config.yaml"):
        raise RunError(f"{storage.uri} holds no config.yaml: not a umim run directory")
    cfg = _config_from_yaml(storage.read_text("config.yaml"))
    checkpoint = latest_checkpoint(storage)
    connect(cfg.run.address)
    sim = Simulation(cfg, storage, quiet=quiet, callbacks=callbacks)
    try:
        sim.start()
        start = 1
        if checkpoint is not None:
            sim.strategy.load_state_dict(checkpoint.strategy)
            sim.history = checkpoint.history
            sim.history.truncate(checkpoint.round)
            start = checkpoint.round + 1
            logger.info("resuming %s after round %d", storage.uri, checkpoint.round)
        return sim.run(start_round=start)
    finally:
        sim.shutdown()


def _yaml(cfg: ExperimentConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _config_from_yaml(text: str) -> ExperimentConfig:
    import yaml

    return from_dict(ExperimentConfig, yaml.safe_load(text))
