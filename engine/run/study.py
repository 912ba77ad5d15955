"""An experiment end to end: the main run, then the evaluations and baselines it asks for.

Steps (each resumable, each marked done under ``progress/`` in the run directory):

1. ``main``: the configured strategy (e.g. ``universal``) from the base encoder;
2. ``finetune``: downstream fine-tuning from the main run's global encoder vs the base;
3. ``lodo-<domain>``: leave-one-domain-out generalisation;
4. ``baseline-<name>-seed<k>``: each baseline strategy on the same data and base.

Every test metric lands in ``results.parquet``; ``summary.json`` holds the per-method,
per-domain table and the paired tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import yaml

from engine.config import ExperimentConfig, from_dict, to_dict
from engine.config.changes import classify_changes, config_changes, describe_refusal
from engine.fl.evaluation import base_teachers, encoder_of, finetune_compare, lodo_encoder
from engine.fl.simulation import Callback, RunError, RunResult, Simulation
from engine.records.checkpoint import latest_checkpoint
from engine.records.history import History
from engine.records.lock import RunLock
from engine.records.results import Results
from engine.records.stats import paired_tests
from engine.records.storage import Storage
from engine.run.build import build_simulation
from engine.run.session import Session, resolve_paths
from strategies.types import POOLED_CID

logger = logging.getLogger(__name__)

RESULTS = "results.parquet"
HISTORY = "history.parquet"
STARTED_CONFIG = "progress/config.yaml"
RESUMES = "progress/resumes.json"
"""The config the run's saved state was made with (``config.yaml`` is the user's to edit)."""


def base_label(cfg: ExperimentConfig) -> str:
    """Name of the base encoder as a method: ``mim`` (the paper's baseline) or ``random-init``."""
    return "mim" if cfg.pretrain.method == "mim" else "random-init"


class Study:
    """Runs the steps of one experiment in a run directory, skipping those already done."""

    def __init__(self, cfg: ExperimentConfig, storage: Storage, *, quiet: bool = False,
                 callbacks: Sequence[Callback] = (), saved: ExperimentConfig | None = None
                 ) -> None:
        self.cfg = cfg
        self.saved = saved or cfg  # as the user wrote it (no machine paths): what is saved
        self.storage = storage
        self.quiet = quiet
        self.callbacks = list(callbacks)
        self.results = (Results.from_parquet_bytes(storage.read_bytes(RESULTS))
                        if storage.exists(RESULTS) else Results())
        self._clock = time.monotonic()

    # -- bookkeeping -----------------------------------------------------------------------
    def _done(self, step: str) -> bool:
        return self.storage.exists(f"progress/{step}.done")

    def _mark(self, step: str, info: dict[str, Any] | None = None) -> None:
        self.storage.write_bytes(RESULTS, self.results.to_parquet_bytes())
        seconds = time.monotonic() - self._clock
        self.storage.write_text(f"progress/{step}.done", json.dumps({"seconds": seconds,
                                                                     **(info or {})}))
        logger.info("step %s done in %.1f s", step, seconds)
        self._clock = time.monotonic()

    # -- steps -----------------------------------------------------------------------------
    def session(self) -> Session:
        """The experiment's session (started: Ray, shards, base encoder, client actors)."""
        observers = [cb.on_client_message for cb in self.callbacks]
        return Session(self.cfg, observers=observers, storage=self.storage).start()

    def execute(self, session: Session) -> RunResult:
        """Run every step not yet done; return the main run's result with the full summary."""
        ev = self.cfg.evaluation
        self._clock = time.monotonic()
        main = self._main(session)
        if ev.finetune_epochs > 0 and ev.seeds:
            self._finetune(session, main)
        if ev.lodo_domains:
            self._lodo(session)
        for name in ev.baselines:
            for seed in ev.baseline_seeds or (self.cfg.seed,):
                self._baseline(session, name, seed)
        summary = self.summary(main.summary, session.base_info)
        self.storage.write_text("summary.json", json.dumps(summary, indent=2, default=float))
        return replace(main, summary=summary, results=Results(self.results.rows))

    def _main(self, session: Session) -> RunResult:
        sim = build_simulation(self.cfg, self.storage, session, quiet=self.quiet,
                               callbacks=self.callbacks)
        checkpoint = latest_checkpoint(self.storage)
        if self._done("main") and checkpoint is not None and checkpoint.round >= sim.rounds:
            sim.restore(checkpoint)
            # the checkpoint's history stops before the final test evaluation; the run's
            # own history.parquet holds it (never recompute the summary from partial state)
            sim.history = History.from_parquet_bytes(self.storage.read_bytes(HISTORY))
            return RunResult(self.storage.uri, self.cfg, sim.history, sim.summary(),
                             sim.strategy.state_dict())
        start = sim.restore(checkpoint) if checkpoint is not None else 1
        if checkpoint is not None:
            logger.info("resuming %s after round %d", self.storage.uri, checkpoint.round)
        result = sim.run(start_round=start)
        method = self.cfg.strategy.name
        self.results.drop(method)
        self._add_history(method, self.cfg.seed, sim)
        curves = result.strategy_state.get("curves")
        if curves:
            self.storage.write_text("distill_curves.json", json.dumps(
                {str(k): v for k, v in curves.items()}, default=float))
        self._mark("main")
        return result

    def _add_history(self, method: str, seed: int, sim: Simulation) -> None:
        for metric in ("auc", "acc"):
            for (client, domain), value in sim.history.latest("test", metric).items():
                self.results.add(method, seed, client, domain, {metric: value})

    def _finetune(self, session: Session, main: RunResult) -> None:
        if self._done("finetune"):
            return
        infos = session.actors.infos()
        cids = sorted(c for c in infos if c != POOLED_CID)
        arms = {f"{self.cfg.strategy.name}+ft": encoder_of(main.strategy_state["encoder"]),
                base_label(self.cfg): session.base}
        for method in arms:
            self.results.drop(method)
        logger.info("downstream fine-tuning of %d clients from %s, seeds %s", len(cids),
                    list(arms), list(self.cfg.evaluation.seeds))
        failed = finetune_compare(session.actors, infos, cids, arms,
                                  epochs=self.cfg.evaluation.finetune_epochs,
                                  seeds=self.cfg.evaluation.seeds, results=self.results)
        self._mark("finetune", {"failures": failed})

    def _lodo(self, session: Session) -> None:
        pending = [d for d in self.cfg.evaluation.lodo_domains if not self._done(f"lodo-{d}")]
        if not pending:
            return
        infos = session.actors.infos()
        cids = sorted(c for c in infos if c != POOLED_CID)
        epochs = (getattr(self.cfg.strategy.options, "local_epochs", None)
                  or self.cfg.train.local_epochs)
        teachers = base_teachers(session.actors, infos, cids, session.base, epochs=epochs,
                                 seed=self.cfg.seed)
        distiller = session.distiller(self.storage)
        for domain in pending:
            encoder, result = lodo_encoder(distiller, session.base, teachers, domain,
                                           self.cfg.distill, seed=self.cfg.seed)
            held = [c for c in cids if domain in infos[c].domains]
            arms = {"lodo:universal+ft": encoder, f"lodo:{base_label(self.cfg)}": session.base}
            failed = finetune_compare(session.actors, infos, held, arms,
                                      epochs=max(self.cfg.evaluation.finetune_epochs, 1),
                                      seeds=self.cfg.evaluation.seeds, results=self.results)
            self._mark(f"lodo-{domain}", {"curve": result.curve, "failures": failed})

    def _baseline(self, session: Session, name: str, seed: int) -> None:
        step = f"baseline-{name}-seed{seed}"
        if self._done(step):
            return
        rounds = self.cfg.evaluation.baseline_rounds or self.cfg.strategy.rounds
        cfg = replace(self.cfg, seed=seed, name=f"{self.cfg.name}-{name}",
                      strategy=self.cfg.evaluation.baseline_strategy(name, rounds))
        storage = Storage(f"{self.storage.uri}/baselines/{name}-seed{seed}")
        saved = replace(self.saved, seed=seed, name=cfg.name, strategy=cfg.strategy)
        storage.write_text("config.yaml", yaml.safe_dump(to_dict(saved), sort_keys=False))
        sim = build_simulation(cfg, storage, session, quiet=self.quiet,
                               callbacks=self.callbacks)
        checkpoint = latest_checkpoint(storage)
        sim.run(start_round=sim.restore(checkpoint) if checkpoint is not None else 1)
        self._add_history(name, seed, sim)
        self._mark(step)

    # -- summary ---------------------------------------------------------------------------
    def comparisons(self) -> list[dict[str, Any]]:
        """Paired tests: fine-tuned from the global encoder vs from the base (and LODO)."""
        label = base_label(self.cfg)
        candidates = [(f"{self.cfg.strategy.name}+ft", label, "downstream"),
                      ("lodo:universal+ft", f"lodo:{label}", "leave-one-domain-out")]
        out = []
        for a, b, kind in candidates:
            for metric in ("auc", "acc"):
                keys, va, vb = self.results.pairs(a, b, metric)
                if keys:
                    out.append({"a": a, "b": b, "kind": kind, "metric": metric,
                                "pairs": [list(k) for k in keys], **paired_tests(va, vb)})
        return out

    def summary(self, main: dict[str, Any], base_info: dict[str, Any]) -> dict[str, Any]:
        """The run summary plus every method's per-domain table and the paired tests."""
        methods = {}
        for metric in ("auc", "acc"):
            for method, rows in self.results.table(metric).items():
                for domain, (mean, std, n) in rows.items():
                    methods.setdefault(method, {}).setdefault(domain, {})[metric] = {
                        "mean": mean, "std": std, "n": n}
        comparisons = self.comparisons()
        downstream = next((c for c in comparisons if c["kind"] == "downstream"
                           and c["metric"] == "auc"), None)
        verdict = None
        if downstream is not None:
            p = downstream["wilcoxon_p_greater"]
            verdict = {"comparison": f"{downstream['a']} > {downstream['b']} (AUC)",
                       "mean_diff": downstream["mean_diff"], "wilcoxon_p_greater": p,
                       "held": bool(not math.isnan(p) and p < 0.05
                                    and downstream["mean_diff"] > 0)}
        base = {k: v for k, v in base_info.items() if k != "path"}
        return {**main, "base": base, "methods": methods, "comparisons": comparisons,
                "claim": verdict, "evaluation_failures": self.evaluation_failures()}

    def evaluation_failures(self) -> list[dict[str, Any]]:
        """Every failed fine-tuning call of the evaluations, by step (the pairs that dropped
        out of a comparison, and why)."""
        out = []
        for name in self.storage.listdir("progress"):
            if name.endswith(".done"):
                info = json.loads(self.storage.read_text(f"progress/{name}"))
                out += [{"step": name.removesuffix(".done"), **f}
                        for f in info.get("failures", [])]
        return out


# -- the public API --------------------------------------------------------------------------
def _new_storage(cfg: ExperimentConfig, out: str | os.PathLike[str] | None) -> Storage:
    if out is not None:
        return Storage(out)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    unique = f"{stamp}-s{cfg.seed}-{secrets.token_hex(2)}"  # runs started together differ
    return Storage(f"{cfg.run.storage_path.rstrip('/')}/{cfg.name}-{unique}")


def _dump(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def run(cfg: ExperimentConfig, *, out: str | os.PathLike[str] | None = None,
        data_root: str | None = None, cache_dir: str | None = None, quiet: bool = False,
        callbacks: Sequence[Callback] = ()) -> RunResult:
    """Run an experiment end to end and write its run directory.

    The run directory is locked first (a second run into it fails at once, naming the
    holder); ``config.yaml`` is written before the session starts, and taken back (with
    the folder, if this call created it) when the session cannot start, so a failed start
    leaves nothing behind.

    Parameters
    ----------
    cfg
        The experiment config (see :func:`engine.config.load_config`).
    out
        Run directory (local path or pyarrow URI); default
        ``<run.storage_path>/<name>-<timestamp>-s<seed>-<random>``.
    data_root, cache_dir
        This machine's data root and cache folder (else ``data.data_root`` /
        ``data.cache_dir``, else the environment); not written into the saved config.
    quiet
        No progress display.
    callbacks
        Hooks into the round loop.

    Returns
    -------
    RunResult
        Run directory, main-run history, summary (with every method and test), the final
        strategy state, and every method's results (``result.results.to_pandas()``).
    """
    storage = _new_storage(cfg, out)
    existed = storage.folder_exists()
    try:
        with RunLock(storage):
            if storage.exists("config.yaml"):
                raise RunError(f"{storage.uri} already holds a run; use "
                               f"`umim resume {storage.uri}`")
            study = Study(resolve_paths(cfg, data_root, cache_dir), storage, quiet=quiet,
                          callbacks=callbacks, saved=cfg)
            storage.write_text("config.yaml", _dump(cfg))
            storage.write_text(STARTED_CONFIG, _dump(cfg))
            try:
                session = study.session()  # data, resources: fails fast, before any step
            except BaseException:
                storage.delete_file("config.yaml")
                storage.delete_file(STARTED_CONFIG)
                storage.remove_if_empty("progress")
                raise
            try:
                return study.execute(session)
            finally:
                session.shutdown()
    except BaseException:
        if not existed:  # a run that never started leaves no folder behind
            storage.remove_if_empty()
        raise


def resume(run_dir: str | os.PathLike[str], *, data_root: str | None = None,
           cache_dir: str | None = None, address: str | None = None, quiet: bool = False,
           callbacks: Sequence[Callback] = ()) -> RunResult:
    """Continue a run from its newest checkpoint and finish the steps not yet done.

    ``config.yaml`` may have been edited since the run started: a change its saved state
    cannot follow is refused naming the keys; placement changes and extensions (more
    baselines, seeds of baselines, LODO domains; more rounds while no later step is done)
    are allowed and recorded in ``progress/resumes.json``.

    Parameters
    ----------
    run_dir
        The run directory.
    data_root, cache_dir
        This machine's folders, as for :func:`run`.
    address
        The Ray cluster to use now, instead of the saved ``run.address``.
    quiet, callbacks
        As for :func:`run`.
    """
    storage = Storage(run_dir)
    if not storage.exists("config.yaml"):
        raise RunError(f"{storage.uri} holds no config.yaml: not a umim run directory")
    with RunLock(storage):
        cfg = from_dict(ExperimentConfig, yaml.safe_load(storage.read_text("config.yaml")))
        _check_resume(storage, cfg)
        here = resolve_paths(cfg, data_root, cache_dir)
        if address:
            here = replace(here, run=replace(here.run, address=address))
        study = Study(here, storage, quiet=quiet, callbacks=callbacks, saved=cfg)
        session = study.session()
        try:
            return study.execute(session)
        finally:
            session.shutdown()


def _check_resume(storage: Storage, cfg: ExperimentConfig) -> None:
    """Refuse a ``config.yaml`` edited beyond what the saved state can follow; record the
    allowed changes (and reopen the main step when its rounds grew)."""
    if not storage.exists(STARTED_CONFIG):  # a run made before this check existed
        storage.write_text(STARTED_CONFIG, _dump(cfg))
        return
    before = yaml.safe_load(storage.read_text(STARTED_CONFIG))
    changes = config_changes(before, to_dict(cfg))
    if not changes:
        return
    done = [name.removesuffix(".done") for name in storage.listdir("progress")
            if name.endswith(".done")]
    allowed, refused = classify_changes(changes, done)
    if refused:
        raise RunError(describe_refusal(refused, changes))
    log = (json.loads(storage.read_text(RESUMES)) if storage.exists(RESUMES) else [])
    log.append({"time": time.time(), "changes": {k: list(v) for k, v in allowed.items()}})
    storage.write_text(RESUMES, json.dumps(log, indent=2, default=str))
    if "strategy.rounds" in allowed:
        storage.delete_file("progress/main.done")  # the main run goes on from its checkpoint
    storage.write_text(STARTED_CONFIG, _dump(cfg))
    logger.info("resuming with changed config: %s", sorted(allowed))
