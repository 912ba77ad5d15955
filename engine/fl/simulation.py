"""The one round loop: strategy, client actors, federated evaluation, checkpoints."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import ExperimentConfig
from engine.fl.dpsgd import EPSILON_TOLERANCE, DPLedger, fit_config, plan_ledger
from engine.fl.failures import ClientFailure
from engine.fl.protocols import ClientPool
from engine.records.checkpoint import Checkpoint, save_checkpoint
from engine.records.history import History
from engine.records.progress import RunProgress
from engine.records.results import Results
from engine.records.storage import Storage
from strategies import Strategy, StrategyContext, create_strategy, nonfinite_keys
from strategies.distill import DistillService
from strategies.types import POOLED_CID, ClientInfo, EvaluateRes, FitRes

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run cannot go on (too many clients failed, a pooled client failed, ...)."""


@dataclass
class RunResult:
    """What a finished run returns (and wrote to ``run_dir``).

    Attributes
    ----------
    run_dir
        The run directory.
    config
        The experiment as it ran.
    history
        The main run's history (``history.to_pandas()``: one row per round, client, domain,
        phase and metric).
    summary
        The summary (``summary.json``).
    strategy_state
        The main strategy's final state (tensors).
    results
        Every method's test metrics (``results.to_pandas()``: method, seed, client, domain,
        metric, value); for a study, the baselines and evaluations too.
    """

    run_dir: str
    config: ExperimentConfig
    history: History
    summary: dict[str, Any]
    strategy_state: dict[str, Any]
    results: Results = field(default_factory=Results)


class Callback:
    """Hooks into the round loop (for tests, logging, chaos experiments)."""

    def on_tasks_submitted(self, sim: Simulation, phase: str, server_round: int) -> None:
        """Called right after a round's ``fit`` or ``evaluate`` tasks were submitted."""

    def on_client_message(self, cid: str, method: str, message: Any) -> None:
        """Called with every object a client actor sends back to the driver, in every phase
        (onboarding, rounds, evaluations, baselines)."""

    def on_round_end(self, sim: Simulation, server_round: int) -> None:
        """Called after a round was aggregated, evaluated and checkpointed."""


HISTORY_EVERY_S = 10.0
"""``history.parquet`` is rewritten after every checkpointed round and otherwise at most this
often (its checkpointed copy is what a resume reads; the last write is at the end)."""

FINAL_VAL = "final_val"
"""History phase of the final evaluation under ``evaluation.split=val``."""


def invalid_parts(res: FitRes) -> list[str]:
    """What makes a client update unusable: the keys of its NaN / Inf tensors, and
    ``"pool_scores"`` when its pool scores hold a NaN / Inf, ``"pool_outputs.<name>"`` for
    its pool outputs' (empty: a valid update)."""
    bad = nonfinite_keys(res.state)
    scores = res.pool_scores
    if scores is not None and not bool(torch.isfinite(scores).all()):
        bad.append("pool_scores")
    if res.pool_outputs is not None:
        bad += [f"pool_outputs.{k}" for k in nonfinite_keys(res.pool_outputs.tensors())]
    return bad


def make_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy with its own options and the engine's context."""
    context = StrategyContext(seed=cfg.seed, distill=cfg.distill.objective(),
                              transfer=cfg.privacy.transfer,
                              sampling=cfg.strategy.sampling())
    return create_strategy(cfg.strategy.name, cfg.strategy.options, context)


def client_domain(info: ClientInfo) -> str:
    """The ``domain`` column of a client's own rows: its domain, or its domains joined by
    ``+`` for a pooled client."""
    return "+".join(info.domains)


class Simulation:
    """Runs one strategy on a started pool of client actors.

    Parameters
    ----------
    cfg
        The experiment.
    storage
        The run directory (config, history, summary, checkpoints).
    actors
        A started :class:`~engine.cluster.pool.ActorPool` (shared by every run of a session).
    encoder
        The initial global encoder (random or the MIM base).
    distiller
        The server's distillation service, for strategies that distil.
    quiet, callbacks
        Progress display and hooks.
    """

    def __init__(self, cfg: ExperimentConfig, storage: Storage, actors: ClientPool,
                 encoder: dict[str, torch.Tensor], *, distiller: DistillService | None = None,
                 quiet: bool = False, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.storage = storage
        self.actors = actors
        self.quiet = quiet
        self.callbacks = list(callbacks)
        self.history = History()
        self.failures: list[dict[str, Any]] = []
        self.strategy = make_strategy(cfg)
        infos = actors.infos()
        self.domain_of = {cid: client_domain(info) for cid, info in infos.items()}
        order = {d: i for i, d in enumerate(cfg.data.domains)}
        self.eval_cids = sorted((c for c in infos if c != POOLED_CID),
                                key=lambda c: (min(order.get(d, len(order))
                                                   for d in infos[c].domains), c))
        if self.strategy.pooled:
            if POOLED_CID not in infos:
                raise RunError(f"strategy {cfg.strategy.name!r} needs the pooled client")
            self.fit_cids = [POOLED_CID]
        else:
            self.fit_cids = list(self.eval_cids)
        self.strategy.initialize([infos[c] for c in self.fit_cids + self.eval_cids
                                  if c in infos], encoder)
        if self.strategy.distils:
            if distiller is None:
                raise RunError(f"strategy {cfg.strategy.name!r} distils and needs a distiller")
            self.strategy.distiller = distiller
        self.rounds = self.strategy.num_rounds(cfg.strategy.rounds)
        # privacy.dp: every training client's DP-SGD plan, checked before any training
        self.dp: DPLedger | None = None
        if cfg.privacy.dp.enabled:
            try:
                self.dp = plan_ledger(cfg.privacy.dp,
                                      {c: infos[c].num_train for c in self.fit_cids},
                                      cfg.train.batch_size, cfg.budget())
            except ValueError as err:
                raise RunError(str(err)) from err
            for cid, plan in self.dp.plans.items():
                logger.info("client %s DP-SGD plan: noise_multiplier=%.4g q=%.4g, %d steps, "
                            "epsilon %.3f of %.3g at delta=%.3g (%s)", cid,
                            plan.noise_multiplier, plan.sample_rate, plan.planned_steps,
                            plan.planned_epsilon, plan.target_epsilon, plan.delta,
                            plan.accountant)
        self._history_written = 0.0  # when history.parquet was last written (monotonic)
        self.best: dict[str, Any] | None = None  # evaluation.select_round=best_val
        # the final evaluation: the test split, or (evaluation.split=val, to tune without
        # touching test) the val split again, recorded apart from the per-round val
        self.final_phase = "test" if cfg.evaluation.split == "test" else FINAL_VAL
        self.fit_cache = None
        # a client that returns predictions keeps its teacher for the privacy audit
        self.keep_teachers = False
        if cfg.run.cache_fits:
            from engine.fl.fitcache import FitCache

            self.fit_cache = FitCache(Path(cfg.data.cache_dir or ".") / "fits", cfg)

    def restore(self, checkpoint: Checkpoint) -> int:
        """Load a checkpoint; returns the first round still to run."""
        self.strategy.load_state_dict(checkpoint.strategy)
        self.history = checkpoint.history
        self.history.truncate(checkpoint.round)
        if self.dp is not None:  # the accountants' histories are the run history's dp_steps
            self.dp.rebuild(self.history.records)
        self.best = checkpoint.extra.get("best")
        return checkpoint.round + 1

    # -- model selection -------------------------------------------------------------------
    def _consider(self, server_round: int) -> None:
        """Keep this round's model if it has the best mean federated val AUC so far among
        rounds that score every domain (``evaluation.select_round=best_val``)."""
        domains = {self.domain_of[c] for c in self.eval_cids}
        val = self.val_auc(server_round)
        if set(val) != domains:
            return  # not every domain has a head yet (an early stage): not comparable
        score = sum(val.values()) / len(val)
        if self.best is None or score > self.best["score"]:
            self.best = {"round": server_round, "score": score,
                         "state": copy.deepcopy(self.strategy.state_dict())}

    def select(self) -> int:
        """Load the model the run reports: the best-on-val round's (``best_val``, when one
        was eligible) or the last; returns its round."""
        if self.cfg.evaluation.select_round != "best_val" or self.best is None:
            return self.rounds
        if self.best["round"] != self.rounds:
            self.strategy.load_state_dict(self.best["state"])
        return int(self.best["round"])

    # -- the loop --------------------------------------------------------------------------
    def run(self, start_round: int = 1) -> RunResult:
        """Run rounds ``start_round .. rounds``, then the final federated test evaluation."""
        with RunProgress(self.rounds, len(self.fit_cids), disable=self.quiet) as progress:
            progress.advance_rounds(start_round - 1)
            for server_round in range(start_round, self.rounds + 1):
                self._fit_round(server_round, progress)
                every = self.cfg.run.evaluate_every
                if every > 0 and (server_round % every == 0 or server_round == self.rounds):
                    self._evaluate(server_round, "val", progress)
                    if self.cfg.evaluation.select_round == "best_val":
                        self._consider(server_round)
                if (server_round % self.cfg.run.checkpoint_every == 0
                        or server_round == self.rounds):
                    writing = time.perf_counter()
                    extra = {"best": self.best} if self.best is not None else {}
                    save_checkpoint(self.storage, Checkpoint(server_round,
                                                             self.strategy.state_dict(),
                                                             self.history, extra),
                                    keep=self.cfg.run.keep_checkpoints)
                    self.history.add(server_round, "", "server", {
                        "checkpoint_seconds": time.perf_counter() - writing})
                    self._write_history()
                elif time.monotonic() - self._history_written >= HISTORY_EVERY_S:
                    self._write_history()  # (many short rounds: not the whole file each)
                progress.advance_rounds(1)
                for cb in self.callbacks:
                    cb.on_round_end(self, server_round)
            selected = self.select()
            self.history.add(self.rounds, "", "server", {"selected_round": float(selected)})
            self._evaluate(self.rounds, self.final_phase, progress)
        self._write_history()
        summary = self.summary()
        self.storage.write_text("summary.json", json.dumps(summary, indent=2))
        return RunResult(self.storage.uri, self.cfg, self.history, summary,
                         self.strategy.state_dict())

    def _dispatch(self, method: str, instructions: dict[str, Any], server_round: int,
                  progress: RunProgress) -> tuple[dict[str, Any], dict[str, ClientFailure]]:
        return self.actors.run(
            method, instructions, progress.client_done,
            lambda: [cb.on_tasks_submitted(self, method, server_round) for cb in self.callbacks])

    def _fit_round(self, server_round: int, progress: RunProgress) -> None:
        sampled = self.strategy.sample_fit(server_round, self.fit_cids)
        instructions = self.strategy.configure_fit(server_round, sampled)
        for ins in instructions.values():
            ins.config = {**ins.config, "round": server_round, "seed": self.cfg.seed,
                          **({"keep_teacher": True} if self.keep_teachers else {})}
        if self.dp is not None:
            self._dp_configure(server_round, instructions)
        progress.start_phase(f"round {server_round} fit", len(instructions))
        started = time.perf_counter()
        cached: dict[str, FitRes] = {}
        if self.fit_cache is not None:
            for cid, ins in instructions.items():
                hit = self.fit_cache.get(cid, ins)
                if hit is not None:
                    cached[cid] = hit
                    progress.client_done()
        todo = {c: i for c, i in instructions.items() if c not in cached}
        results, failures = self._dispatch("fit", todo, server_round, progress)
        if self.fit_cache is not None:
            for cid, res in results.items():
                if not invalid_parts(res):
                    self.fit_cache.put(cid, instructions[cid], res)
        results.update(cached)
        seconds = time.perf_counter() - started
        valid: dict[str, FitRes] = {}
        for cid in sorted(results):
            res = results[cid]
            bad = invalid_parts(res)
            if bad:
                failures[cid] = ClientFailure("nonfinite_update", f"NaN/Inf in {bad[:3]}")
                continue
            valid[cid] = res
            self.history.add(server_round, cid, "fit", res.metrics,
                             domain=self.domain_of.get(cid, ""))
        for cid, failure in failures.items():
            self._record_failure(server_round, cid, failure.kind, failure.message)
        if self.dp is not None:
            self._dp_account(server_round, results, valid)
        needed = math.ceil(self.cfg.clients.min_fit_fraction * len(instructions))
        if len(valid) < needed:
            raise RunError(f"round {server_round}: only {len(valid)} of {len(instructions)} "
                           f"clients returned a valid update, {needed} needed "
                           f"(clients.min_fit_fraction={self.cfg.clients.min_fit_fraction}); "
                           f"failures: { {c: str(f) for c, f in failures.items()} }")
        epochs = max((float(ins.config.get("epochs", self.cfg.train.local_epochs))
                      for ins in instructions.values()), default=0.0)
        samples = sum(r.num_examples for c, r in valid.items() if c not in cached) * epochs
        aggregating = time.perf_counter()
        server_metrics = self.strategy.aggregate_fit(
            server_round, valid, {c: str(f) for c, f in failures.items()})
        server_metrics = {**server_metrics, "fit_seconds": seconds,
                          "aggregate_seconds": time.perf_counter() - aggregating,
                          "fit_samples_per_s": samples / max(seconds, 1e-9),
                          "fit_cached": float(len(cached)),
                          "clients_sampled": float(len(instructions))}
        self.history.add(server_round, "", "server", server_metrics)

    def _evaluate(self, server_round: int, phase: str, progress: RunProgress) -> None:
        """Federated evaluation recorded as ``phase`` (``val``, ``test`` or ``final_val``,
        which scores the val split)."""
        split = "val" if phase == FINAL_VAL else phase
        # a per-round val evaluation may score a sample of the clients; the final one all
        cids = (self.strategy.sample_evaluate(server_round, self.eval_cids) if phase == "val"
                else self.eval_cids)
        instructions = self.strategy.configure_evaluate(server_round, cids, split)
        progress.start_phase(f"round {server_round} {phase}", len(instructions))
        results, failures = self._dispatch("evaluate", instructions, server_round, progress)
        for cid in sorted(results):
            res: EvaluateRes = results[cid]
            for domain, metrics in res.metrics.items():
                self.history.add(server_round, cid, phase, metrics, domain=domain)
        for cid, failure in failures.items():
            self._record_failure(server_round, cid, f"{phase}_failed", str(failure))
        val = self.val_auc(server_round) if phase == "val" else {}
        if val:
            progress.metric("val AUC (mean)", sum(val.values()) / len(val),
                            f"round {server_round}/{self.rounds}, {len(val)} domain(s)")

    # -- differential privacy (privacy.dp; engine.fl.dpsgd) ---------------------------------
    def _dp_configure(self, server_round: int, instructions: dict[str, Any]) -> None:
        """Put each client's DP-SGD plan into its fit config; stop the run, before this
        round trains, when a client's steps this round would take it over its target."""
        assert self.dp is not None
        for cid, ins in instructions.items():
            plan = self.dp.plans[cid]
            epochs = int(ins.config.get("epochs", self.cfg.train.local_epochs))
            eps = self.dp.projected(cid, epochs * plan.steps_per_epoch)
            if eps > plan.target_epsilon + EPSILON_TOLERANCE:
                raise RunError(f"round {server_round}: client {cid} would spend epsilon="
                               f"{eps:.3f} > privacy.dp.epsilon={plan.target_epsilon} "
                               f"(delta={plan.delta:.3g}) with this round's {epochs} epochs "
                               f"({self.dp.steps(cid)} DP steps so far, "
                               f"{plan.planned_steps} planned); the run stops here")
            ins.config = {**ins.config, **fit_config(plan)}

    def _dp_account(self, server_round: int, results: dict[str, FitRes],
                    valid: dict[str, FitRes]) -> None:
        """Add the round's DP steps of every returned update (a rejected one was released
        too) to its client's accountant, record its spent epsilon (``fit`` phase:
        ``dp_epsilon``, ``dp_delta``; a rejected update's ``dp_*`` metrics as well, so a
        resume rebuilds the same ledger) and stop the run if one is over."""
        assert self.dp is not None
        for cid in sorted(results):
            res = results[cid]
            if cid not in valid:
                self.history.add(server_round, cid, "fit",
                                 {k: v for k, v in res.metrics.items() if k.startswith("dp_")},
                                 domain=self.domain_of.get(cid, ""))
            eps = self.dp.record(cid, res.metrics)
            self.history.add(server_round, cid, "fit",
                             {"dp_epsilon": eps, "dp_delta": self.dp.plans[cid].delta},
                             domain=self.domain_of.get(cid, ""))
        over = self.dp.over_target()
        if over:
            self._write_history()
            raise RunError(f"round {server_round}: clients over privacy.dp.epsilon="
                           f"{self.cfg.privacy.dp.epsilon}: "
                           f"{ {c: round(e, 3) for c, e in over.items()} }; the run stops")

    # -- bookkeeping -----------------------------------------------------------------------
    def _record_failure(self, server_round: int, cid: str, kind: str, reason: str) -> None:
        logger.warning("round %d: client %s %s: %s", server_round, cid, kind, reason)
        self.history.add(server_round, cid, "failure", {kind: 1.0})
        self.failures.append({"round": server_round, "client": cid, "kind": kind,
                              "reason": reason[:2000]})

    def _write_history(self) -> None:
        self.storage.write_bytes("history.parquet", self.history.to_parquet_bytes())
        self._history_written = time.monotonic()

    def val_auc(self, server_round: int) -> dict[str, float]:
        """Domain -> federated val AUC of the global model after ``server_round`` (mean over
        the domain's clients; only domains that were scored that round)."""
        values: dict[str, list[float]] = {}
        for r in self.history.records:
            if (r.round == server_round and r.phase == "val" and r.metric == "auc"
                    and not math.isnan(r.value)):
                values.setdefault(r.domain, []).append(r.value)
        return {d: sum(v) / len(v) for d, v in values.items()}

    def summary(self) -> dict[str, Any]:
        """Final per-domain test metrics (mean over a domain's clients) and run facts."""
        test = {m: self.history.latest(self.final_phase, m) for m in ("auc", "acc")}
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
        selected = (int(self.best["round"]) if self.best is not None
                    and self.cfg.evaluation.select_round == "best_val" else self.rounds)
        val = self.val_auc(selected)
        return {"name": self.cfg.name, "strategy": self.cfg.strategy.name,
                "rounds": self.rounds, "selected_round": selected, "seed": self.cfg.seed,
                "domains": domains,
                "mean_test_auc": sum(aucs) / len(aucs) if aucs else math.nan,
                "mean_val_auc": sum(val.values()) / len(val) if val else math.nan,
                "fit_samples_per_s": sum(throughput) / len(throughput) if throughput else None,
                "failures": self.failures}
