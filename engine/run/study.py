"""An experiment end to end: the main run, then the baselines and evaluations it asks for,
once per independent replicate.

Steps of each replicate (each resumable, each marked done under ``progress/``; with
``evaluation.replicates > 1`` replicate ``r`` runs under ``replicates/<r>/`` with seed
``seed + r`` and its steps are named ``r<r>-<step>``):

1. ``main``: the configured strategy (e.g. ``universal``) from the replicate's base encoder;
2. ``baseline-<name>-seed<k>``: each baseline strategy on the same data, base and budget;
3. ``eval-<mode>[-<pct>pct]``: every encoder of ``evaluation.encoders`` judged by each
   evaluation mode at each label fraction, at every client on its own data;
4. ``lodo-<domain>``: leave-one-domain-out generalisation;
5. ``audit`` (``evaluation.privacy_audit``): every client attacks each model that left it or
   that the server released (:mod:`engine.run.audit`).

Every test metric lands in ``results.parquet`` (with its replicate); ``summary.json`` holds
the per-method, per-domain table with 95% CIs over replicates, every comparison with its
hierarchical-bootstrap CI and Holm-corrected p, the budgets, and the verdict about the
pre-registered primary comparison.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import torch
import yaml

from engine.config import ExperimentConfig, from_dict, to_dict
from engine.config.changes import classify_changes, config_changes, describe_refusal
from engine.fl.evaluation import base_teachers, encoder_of, evaluate_encoders, lodo_encoder
from engine.fl.simulation import Callback, RunError, RunResult, Simulation
from engine.records.checkpoint import latest_checkpoint
from engine.records.history import History
from engine.records.lock import RunLock
from engine.records.progress import SETUP_STEP, PipelineProgress, current
from engine.records.results import Results
from engine.records.stats import compare_units, holm
from engine.records.storage import Storage
from engine.run.audit import TeacherCapture, audit_replicate, privacy_summary
from engine.run.build import build_simulation
from engine.run.names import (
    base_label,
    encoder_label,
    lodo_label,
    method_name,
    replicate_step,
    step_name,
)
from engine.run.session import Session, initial_encoder, replicate_seeds, resolve_paths
from engine.run.tracking import StudyTracker, check_tracking, open_tracker
from engine.train.mim import pool_composition
from strategies.aggregate import weighted_average
from strategies.distill import Teacher
from strategies.types import POOLED_CID, State

logger = logging.getLogger(__name__)

RESULTS = "results.parquet"
HISTORY = "history.parquet"
STARTED_CONFIG = "progress/config.yaml"
RESUMES = "progress/resumes.json"
"""The config the run's saved state was made with (``config.yaml`` is the user's to edit)."""
ENCODER_FILE = "encoder.pt"
def _tensors_bytes(state: State) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


@dataclass
class Replicate:
    """One independent whole pipeline of a study: its index, seed, config, run directory and
    base encoder (and, once computed, the clients' teachers from the base)."""

    index: int
    seed: int
    cfg: ExperimentConfig
    storage: Storage
    base: State
    count: int
    teachers: list[Teacher] | None = None

    def step(self, name: str) -> str:
        """The progress step ``name`` of this replicate (of ``count``)."""
        return replicate_step(name, self.index, self.count)


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
        self.tracker: StudyTracker | None = None  # opened by execute (run.tracking)
        self.capture = TeacherCapture()  # the main run's returned models, for the audit
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
        current().end(step, seconds)
        self._clock = time.monotonic()

    def display(self) -> PipelineProgress:
        """The live progress display of this study's steps (those already done counted)."""
        from engine.run.plan import placement_plan

        steps = [s["step"] for s in placement_plan(self.cfg)["steps"]]
        done = [n.removesuffix(".done") for n in self.storage.listdir("progress")
                if n.endswith(".done")]
        return PipelineProgress(steps, done=done, disable=self.quiet)

    # -- steps -----------------------------------------------------------------------------
    def session(self) -> Session:
        """The experiment's session (started: Ray, shards, base encoders, client actors)."""
        observers = [cb.on_client_message for cb in self.callbacks]
        if self.cfg.evaluation.privacy_audit:  # keep each client's returned model
            observers.append(self.capture)
        current().begin(SETUP_STEP)
        session = Session(self.cfg, observers=observers, storage=self.storage).start()
        current().end(SETUP_STEP)
        return session

    def replicates(self, session: Session) -> list[Replicate]:
        """Every replicate of the study, in order."""
        seeds = replicate_seeds(self.cfg)
        return [Replicate(r, seed, replace(self.cfg, seed=seed),
                          self.storage if len(seeds) == 1
                          else Storage(f"{self.storage.uri}/replicates/{r}"),
                          session.base_for(seed), len(seeds))
                for r, seed in enumerate(seeds)]

    def execute(self, session: Session) -> RunResult:
        """Run every step not yet done; return the first replicate's main run with the full
        summary."""
        ev = self.cfg.evaluation
        self._clock = time.monotonic()
        self.tracker = open_tracker(self.cfg, self.saved, self.storage)  # run.tracking
        mains = []
        for rep in self.replicates(session):
            main = self._main(session, rep)
            self._track(rep)
            mains.append(main)
            for name in ev.baselines:
                for seed in ev.baseline_seeds or (rep.seed,):
                    self._baseline(session, rep, name, seed)
                    self._track(rep)
            if ev.finetune_epochs > 0:
                self._evaluations(session, rep, main)
                self._track(rep)
            if ev.lodo_domains:
                self._lodo(session, rep)
                self._track(rep)
            if ev.privacy_audit:
                self._audit(session, rep)
        summary = self.summary(mains[0].summary, session.base_info)
        summary["bases"] = [{k: v for k, v in session.base_infos[rep_seed].items()
                             if k not in ("path", "curve")}
                            for rep_seed in replicate_seeds(self.cfg)]
        self.storage.write_text("summary.json", json.dumps(summary, indent=2, default=float))
        if self.tracker is not None:
            self.tracker.finish(summary)
        return replace(mains[0], summary=summary, results=Results(self.results.rows))

    def _track(self, rep: Replicate) -> None:
        """Log the replicate's finished steps to the tracker (``run.tracking``)."""
        if self.tracker is not None:
            self.tracker.sync(rep.index, rep.count, rep.seed, rep.storage)

    def track_failure(self, error: BaseException) -> None:
        """Mark the tracked run as failed (a resume continues it)."""
        if self.tracker is not None:
            self.tracker.fail(error)

    def _main(self, session: Session, rep: Replicate) -> RunResult:
        sim = build_simulation(rep.cfg, rep.storage, session, quiet=self.quiet,
                               callbacks=self.callbacks, encoder=rep.base)
        checkpoint = latest_checkpoint(rep.storage)
        if (self._done(rep.step("main")) and checkpoint is not None
                and checkpoint.round >= sim.rounds):
            sim.restore(checkpoint)
            sim.select()
            # the checkpoint's history stops before the final test evaluation; the run's
            # own history.parquet holds it (never recompute the summary from partial state)
            sim.history = History.from_parquet_bytes(rep.storage.read_bytes(HISTORY))
            return RunResult(rep.storage.uri, rep.cfg, sim.history, sim.summary(),
                             sim.strategy.state_dict())
        start = sim.restore(checkpoint) if checkpoint is not None else 1
        if checkpoint is not None:
            logger.info("resuming %s after round %d", rep.storage.uri, checkpoint.round)
        current().begin(rep.step("main"), total=sim.rounds, unit="rounds")
        if self.cfg.evaluation.privacy_audit:
            self.capture.start(rep.storage)
            # a teacher that stays home (predictions) is kept there for the audit
            sim.keep_teachers = self.cfg.privacy.transfer != "weights"
        try:
            result = sim.run(start_round=start)
        finally:
            self.capture.stop()
        method = self.cfg.strategy.name
        self.results.drop(method, replicate=rep.index)
        self._add_history(method, rep.seed, sim, rep.index)
        curves = result.strategy_state.get("curves")
        if curves:
            rep.storage.write_text("distill_curves.json", json.dumps(
                {str(k): v for k, v in curves.items()}, default=float))
        self._mark(rep.step("main"), {"selected_round": result.summary.get("selected_round")})
        return result

    def _add_history(self, method: str, seed: int, sim: Simulation, replicate: int) -> None:
        for metric in ("auc", "acc"):
            for (client, domain), value in sim.history.latest(sim.final_phase,
                                                              metric).items():
                self.results.add(method, seed, client, domain, {metric: value},
                                 replicate=replicate)

    def _baseline(self, session: Session, rep: Replicate, name: str, seed: int) -> None:
        step = rep.step(f"baseline-{name}-seed{seed}")
        if self._done(step):
            return
        rounds = self.cfg.baseline_rounds(name)
        cfg = replace(rep.cfg, seed=seed, name=f"{self.cfg.name}-{name}",
                      strategy=self.cfg.evaluation.baseline_strategy(name, rounds))
        storage = Storage(f"{rep.storage.uri}/baselines/{name}-seed{seed}")
        saved = replace(self.saved, seed=seed, name=cfg.name, strategy=cfg.strategy)
        storage.write_text("config.yaml", yaml.safe_dump(to_dict(saved), sort_keys=False))
        sim = build_simulation(cfg, storage, session, quiet=self.quiet,
                               callbacks=self.callbacks, encoder=rep.base)
        checkpoint = latest_checkpoint(storage)
        current().begin(step, total=sim.rounds, unit="rounds")
        result = sim.run(start_round=sim.restore(checkpoint) if checkpoint is not None else 1)
        storage.write_bytes(ENCODER_FILE, _tensors_bytes(encoder_of(result.strategy_state
                                                                    ["encoder"])))
        self.results.drop(name, replicate=rep.index)
        self._add_history(name, seed, sim, rep.index)
        self._mark(step, {"selected_round": result.summary.get("selected_round")})

    def _teachers(self, session: Session, rep: Replicate) -> list[Teacher]:
        """Every client fine-tuned once from the replicate's base for the main run's budget
        (the merged encoder's parts and the LODO global models' teachers)."""
        if rep.teachers is None:
            infos = session.actors.infos()
            cids = sorted(c for c in infos if c != POOLED_CID)
            rep.teachers = base_teachers(session.actors, infos, cids, rep.base,
                                         epochs=self.cfg.budget(), seed=rep.seed)
        return rep.teachers

    def _arms(self, session: Session, rep: Replicate, main: RunResult) -> dict[str, State]:
        """Encoder label -> encoder state, for every arm of ``evaluation.encoders``."""
        arms: dict[str, State] = {}
        for arm in self.cfg.evaluation.encoders:
            label = encoder_label(self.cfg, arm)
            if arm == "main":
                arms[label] = encoder_of(main.strategy_state["encoder"])
            elif arm == "base":
                arms[label] = rep.base
            elif arm == "random":
                arms[label] = initial_encoder(replace(rep.cfg, seed=rep.seed + 7919))
            elif arm == "merged":
                teachers = self._teachers(session, rep)
                parts = list({t.cid: t for t in teachers}.values())  # one encoder per client
                arms[label] = weighted_average([encoder_of(t.state) for t in parts],
                                               [t.weight for t in parts])
            else:  # a baseline's global encoder
                seed = (self.cfg.evaluation.baseline_seeds or (rep.seed,))[0]
                folder = Storage(f"{rep.storage.uri}/baselines/{arm}-seed{seed}")
                arms[label] = torch.load(io.BytesIO(folder.read_bytes(ENCODER_FILE)),
                                         weights_only=True)
        return arms

    def _evaluations(self, session: Session, rep: Replicate, main: RunResult) -> None:
        ev = self.cfg.evaluation
        pending = [(m, f) for m in ev.modes for f in ev.label_fractions
                   if not self._done(rep.step(step_name(m, f)))]
        if not pending:
            return
        arms = self._arms(session, rep, main)
        infos = session.actors.infos()
        cids = sorted(c for c in infos if c != POOLED_CID)
        for mode, fraction in pending:
            methods = {method_name(label, mode, fraction): enc for label, enc in arms.items()}
            current().begin(rep.step(step_name(mode, fraction)),
                            total=len(methods) * len(self._eval_seeds(rep)), unit="calls")
            for method in methods:
                self.results.drop(method, replicate=rep.index)
            logger.info("replicate %d: %s at %g%% of the labels, encoders %s", rep.index,
                        mode, fraction * 100, list(arms))
            failed = evaluate_encoders(session.actors, infos, cids, methods,
                                       self._eval_config(rep, mode, fraction),
                                       seeds=self._eval_seeds(rep), results=self.results,
                                       replicate=rep.index)
            self._mark(rep.step(step_name(mode, fraction)), {"failures": failed})

    def _eval_config(self, rep: Replicate, mode: str, fraction: float) -> dict[str, Any]:
        ev = self.cfg.evaluation
        epochs = ev.probe_epochs if mode == "linear_probe" else ev.finetune_epochs
        return {"mode": mode, "label_fraction": fraction, "subset_seed": rep.seed,
                "epochs": epochs, "select_on_val": True, "k": ev.knn_k, "split": ev.split}

    def _eval_seeds(self, rep: Replicate) -> dict[int, int]:
        """Evaluation seed -> the seed its clients train with in this replicate."""
        return {k: k + 1000 * rep.index for k in self.cfg.evaluation.seeds}

    def _lodo(self, session: Session, rep: Replicate) -> None:
        ev = self.cfg.evaluation
        pending = [d for d in ev.lodo_domains if not self._done(rep.step(f"lodo-{d}"))]
        if not pending:
            return
        infos = session.actors.infos()
        cids = sorted(c for c in infos if c != POOLED_CID)
        teachers = self._teachers(session, rep)
        distiller = session.distiller(rep.storage, seed=rep.seed)
        for domain in pending:
            current().begin(rep.step(f"lodo-{domain}"), unit="jobs",
                            total=1 + 2 * len(ev.modes) * len(ev.label_fractions)
                            * len(self._eval_seeds(rep)))
            encoder, result = lodo_encoder(distiller, rep.base, teachers, domain,
                                           self.cfg.distill, seed=rep.seed)
            current().advance_step()
            held = [c for c in cids if domain in infos[c].domains]
            failed: list[dict[str, Any]] = []
            for mode in ev.modes:
                for fraction in ev.label_fractions:
                    methods = {
                        f"lodo:{method_name(lodo_label(self.cfg), mode, fraction)}": encoder,
                        f"lodo:{method_name(base_label(self.cfg), mode, fraction)}": rep.base}
                    failed += evaluate_encoders(
                        session.actors, infos, held, methods,
                        self._eval_config(rep, mode, fraction), seeds=self._eval_seeds(rep),
                        results=self.results, replicate=rep.index)
            self._mark(rep.step(f"lodo-{domain}"), {"curve": result.curve, "failures": failed,
                                                    "teachers": sorted({t.domain for t in
                                                                        teachers
                                                                        if t.domain != domain})})

    def _audit(self, session: Session, rep: Replicate) -> None:
        """The privacy audit of one replicate (:func:`engine.run.audit.audit_replicate`)."""
        step = rep.step("audit")
        if self._done(step):
            return
        current().begin(step)
        self._mark(step, audit_replicate(self.cfg, rep, session, self.results))

    # -- summary ---------------------------------------------------------------------------
    def comparisons(self) -> list[dict[str, Any]]:
        """Every comparison the study reports, AUC first, each over (domain, replicate)
        units with a hierarchical-bootstrap CI; Holm-corrected over the AUC family, and the
        pre-registered primary one marked."""
        ev, cfg = self.cfg.evaluation, self.cfg
        primary = ev.primary
        prim = (method_name(encoder_label(cfg, primary.a), primary.mode, primary.label_fraction),
                method_name(encoder_label(cfg, primary.b), primary.mode,
                            primary.label_fraction), primary.metric)
        candidates: list[tuple[str, str, str, str, float]] = []
        main = encoder_label(cfg, "main")
        for mode in ev.modes:
            for fraction in ev.label_fractions:
                a = method_name(main, mode, fraction)
                for arm in ev.encoders:
                    if arm != "main":
                        b = method_name(encoder_label(cfg, arm), mode, fraction)
                        candidates.append((a, b, "downstream", mode, fraction))
                candidates.append((f"lodo:{method_name(lodo_label(cfg), mode, fraction)}",
                                   f"lodo:{method_name(base_label(cfg), mode, fraction)}",
                                   "leave-one-domain-out", mode, fraction))
        for name in ev.baselines:
            candidates.append((cfg.strategy.name, name, "global model", "global", 1.0))
        if (prim[0], prim[1]) not in {(a, b) for a, b, *_ in candidates}:
            candidates.insert(0, (prim[0], prim[1], "downstream", primary.mode,
                                  primary.label_fraction))
        out = []
        for a, b, kind, mode, fraction in candidates:
            for metric in ("auc", "acc"):
                va, vb = self.results.per_unit(a, metric), self.results.per_unit(b, metric)
                if not set(va) & set(vb):
                    continue
                stats = compare_units(va, vb, seed=cfg.seed)
                out.append({"a": a, "b": b, "kind": kind, "mode": mode,
                            "label_fraction": fraction, "metric": metric,
                            "primary": (a, b, metric) == prim, **stats})
        family = {i: self._p(c) for i, c in enumerate(out) if c["metric"] == primary.metric}
        adjusted = holm({str(i): p for i, p in family.items()})
        for i, c in enumerate(out):
            c["p"] = self._p(c)
            c["holm_p"] = adjusted.get(str(i), math.nan)
        return out

    def _p(self, comparison: dict[str, Any]) -> float:
        """The pre-registered test's one-sided p (``a > b``) of a comparison."""
        primary = self.cfg.evaluation.primary
        unit = "over_units" if primary.unit == "units" else "over_domains"
        return float(comparison[unit][f"{primary.test}_p_greater"])

    def summary(self, main: dict[str, Any], base_info: dict[str, Any]) -> dict[str, Any]:
        """The run summary plus every method's per-domain table, the comparisons, the
        budgets and the verdict on the primary comparison."""
        methods: dict[str, dict[str, dict[str, Any]]] = {}
        for metric in ("auc", "acc"):
            for method, rows in self.results.table(metric).items():
                for domain, cell in rows.items():
                    methods.setdefault(method, {}).setdefault(domain, {})[metric] = dict(cell)
        comparisons = self.comparisons()
        primary = next((c for c in comparisons if c["primary"]), None)
        verdict = None
        spec = self.cfg.evaluation.primary
        over = "(domain, replicate) units" if spec.unit == "units" else "domains"
        if primary is not None:
            held = bool(not math.isnan(primary["holm_p"]) and primary["holm_p"] < 0.05
                        and primary["mean_diff"] > 0)
            verdict = {"comparison": f"{primary['a']} > {primary['b']} "
                                     f"({spec.metric.upper()})",
                       "mode": spec.mode, "label_fraction": spec.label_fraction,
                       "mean_diff": primary["mean_diff"], "ci95": primary["ci95"],
                       "p": primary["p"], "holm_p": primary["holm_p"],
                       "test": f"one-sided {spec.test} over {over}",
                       "n_domains": primary["n_domains"],
                       "n_replicates": primary["n_replicates"], "held": held}
        base = {k: v for k, v in base_info.items() if k != "path"}
        return {**main, "base": base, "scored_split": self.cfg.evaluation.split,
                "select_rule": self.cfg.evaluation.select_round,
                "replicates": self.cfg.evaluation.replicates,
                "replicate_seeds": replicate_seeds(self.cfg),
                "budgets": {"client_epochs": self.cfg.budgets(),
                            "evaluation_epochs": self.cfg.evaluation.finetune_epochs,
                            "probe_epochs": self.cfg.evaluation.probe_epochs},
                "pool": self.pool_description(), "primary": asdict(spec),
                "methods": methods, "heads_vs_local": self.heads_vs_local(methods),
                "comparisons": comparisons, "claim": verdict,
                "evaluation_failures": self.evaluation_failures(),
                **({"privacy": privacy_summary(self.cfg, self.results)}
                   if self.cfg.evaluation.privacy_audit else {})}

    def pool_description(self) -> dict[str, Any]:
        """What the server's unlabelled pool held (said in the report): its sources and the
        images per source MIM and distillation trained on."""
        data = self.cfg.data
        sources = [f"MedNIST: the half of every MedNIST class not given to any client "
                   f"(mednist_seed {data.mednist_seed}; CT, MRI and X-ray)"]
        if data.pool_share > 0:
            sources.append(f"{data.pool_share:g} of every client domain's train split "
                           f"(images only, taken out of the clients' train splits)")
        if data.pool_sources:
            sources.append(f"the whole train splits of {list(data.pool_sources)} (images only)")
        return {"sources": sources, "cap": data.pool_size, "pool_share": data.pool_share,
                "pool_sources": list(data.pool_sources),
                "composition": pool_composition(data)}

    def heads_vs_local(self, methods: dict[str, Any]) -> dict[str, Any]:
        """Per domain: the main run's global model (its heads) minus local training, test
        AUC (mean over replicates); the target is within 0.03."""
        main, local = methods.get(self.cfg.strategy.name), methods.get("local")
        if not main or not local:
            return {}
        out = {}
        for domain in self.cfg.data.domains:
            if "auc" in main.get(domain, {}) and "auc" in local.get(domain, {}):
                diff = main[domain]["auc"]["mean"] - local[domain]["auc"]["mean"]
                out[domain] = {"diff": diff, "within_0.03": bool(diff >= -0.03)}
        return out

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
        callbacks: Sequence[Callback] = (),
        config_file: str | os.PathLike[str] | None = None) -> RunResult:
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
    config_file
        The file ``cfg`` was read from, recorded in ``origin.json`` (``umim report`` links
        the sweep's plots when it is a sweep's ``best.yaml``).

    Returns
    -------
    RunResult
        Run directory, main-run history, summary (with every method and test), the final
        strategy state, and every method's results (``result.results.to_pandas()``).
    """
    storage = _new_storage(cfg, out)
    check_tracking(cfg, storage)
    existed = storage.folder_exists()
    try:
        with RunLock(storage), contextlib.ExitStack() as live:
            if storage.exists("config.yaml"):
                raise RunError(f"{storage.uri} already holds a run; use "
                               f"`umim resume {storage.uri}`")
            study = Study(resolve_paths(cfg, data_root, cache_dir), storage, quiet=quiet,
                          callbacks=callbacks, saved=cfg)
            live.enter_context(study.display())  # the live progress of every step
            storage.write_text("config.yaml", _dump(cfg))
            storage.write_text(STARTED_CONFIG, _dump(cfg))
            if config_file is not None:
                storage.write_text("origin.json", json.dumps(
                    {"config_file": os.path.abspath(config_file)}))
            try:
                session = study.session()  # data, resources: fails fast, before any step
            except BaseException:
                storage.delete_file("config.yaml")
                storage.delete_file(STARTED_CONFIG)
                storage.delete_file("origin.json")
                storage.remove_if_empty("progress")
                raise
            try:
                return study.execute(session)
            except BaseException as err:
                study.track_failure(err)
                raise
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
    with RunLock(storage), contextlib.ExitStack() as live:
        cfg = from_dict(ExperimentConfig, yaml.safe_load(storage.read_text("config.yaml")))
        _check_resume(storage, cfg)
        here = resolve_paths(cfg, data_root, cache_dir)
        if address:
            here = replace(here, run=replace(here.run, address=address))
        study = Study(here, storage, quiet=quiet, callbacks=callbacks, saved=cfg)
        live.enter_context(study.display())  # the live progress of the steps still to do
        session = study.session()
        try:
            return study.execute(session)
        except BaseException as err:
            study.track_failure(err)
            raise
        finally:
            session.shutdown()


def _check_resume(storage: Storage, cfg: ExperimentConfig) -> None:
    """Refuse a ``config.yaml`` edited beyond what the saved state can follow; record the
    allowed changes (and reopen the main step when its rounds grew)."""
    if not storage.exists(STARTED_CONFIG):  # a run made before this check existed
        storage.write_text(STARTED_CONFIG, _dump(cfg))
        return
    before = yaml.safe_load(storage.read_text(STARTED_CONFIG))
    with contextlib.suppress(Exception):  # keys added to the schema since: their defaults
        before = to_dict(from_dict(ExperimentConfig, before))
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
