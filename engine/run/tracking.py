"""Experiment tracking with MLflow (``run.tracking: mlflow``).

A study is one MLflow run (named after the experiment) holding the resolved config as
params (flattened dotted keys, :func:`flatten_params`), with one nested run per step:

* ``main`` and every ``baseline-<name>-seed<k>``: every metric of the step's
  ``history.parquet`` with ``step`` = the round (:func:`history_metrics`: per domain,
  ``val_auc/<domain>``, ``val_auc/mean``, ``test_acc/<domain>``, ...; per client,
  ``fit_loss/<client>``, ...);
* every evaluation method (``universal+ft``, ``mim+lp``, ...) and every
  leave-one-domain-out method: its scored metrics per domain (mean over the evaluation
  seeds), ``test_auc/<domain>``.

When the study finishes, the parent run gets the report (``report.md`` and its plots,
written then), ``summary.json`` and ``config.yaml`` as artefacts.

Everything is logged by the driver from the files of the run folder after each step, so a
resumed run logs what it had not logged yet into the same MLflow runs: their ids are kept
in ``tracking.json`` in the run folder. The default store is ``sqlite:///<run
dir>/mlflow.db`` (the artefacts go to ``<run dir>/mlartifacts``); view it with ``mlflow ui
--backend-store-uri sqlite:///<run dir>/mlflow.db``.

A sweep whose base experiment tracks with MLflow logs each trial as one MLflow run through
Ray Tune's ``MLflowLoggerCallback`` (:func:`sweep_callback`): the trial's resolved config as
params and every round's objective and ``val_auc/<domain>`` with ``step`` = the round.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import ExperimentConfig, to_dict
from engine.records.history import History
from engine.records.results import Results
from engine.records.storage import Storage
from engine.run.names import (
    base_label,
    encoder_label,
    lodo_label,
    method_name,
    replicate_step,
    step_name,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
"""The run folder's record of its MLflow runs: URI, experiment, parent and nested run ids."""
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)."""
MAX_KEY_LENGTH = 250
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")
REPORT_FILES = ("report.md", "report.html", "summary.json", "config.yaml")
HISTORY = "history.parquet"  # the names engine.run.study writes
RESULTS = "results.parquet"


# -- plain data -> MLflow names ----------------------------------------------------------------
def mlflow_key(name: str) -> str:
    """``name`` with every character MLflow refuses in a param or metric key replaced by
    ``_`` (MLflow keys: letters, digits, ``_ - . / :`` and spaces), at most 250 long."""
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_KEY_LENGTH]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > MAX_PARAM_LENGTH:
        cut = "...[truncated]"
        text = text[:MAX_PARAM_LENGTH - len(cut)] + cut
    return text


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested plain-data config as MLflow params: dotted keys, string values.

    Parameters
    ----------
    config
        Nested mappings (e.g. ``engine.config.to_dict(cfg)``).
    prefix
        Prepended to every key (used by the recursion).

    Returns
    -------
    dict
        ``{"train.lr": "0.001", "data.domains": '["breast", "retina"]', "run.address":
        "null", ...}``: strings stay as they are, other leaves (numbers, booleans, ``None``,
        lists) are JSON; an empty mapping is ``{}``. Values longer than MLflow's 6000
        characters are cut and end in ``...[truncated]``; characters MLflow refuses in a
        key become ``_``.
    """
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[mlflow_key(name)] = _param_value(dict(value) if isinstance(value, Mapping)
                                                 else value)
    return out


def history_metrics(history: History, *, after_round: int = 0
                    ) -> list[tuple[str, float, int]]:
    """Every finite value of ``history`` as ``(key, value, step)`` with ``step`` = the round.

    Validation and test metrics are per domain (the mean over the domain's clients):
    ``val_auc/<domain>``, plus ``val_auc/mean`` over the domains of the round; the others
    are per client (``fit_loss/<client>``, ``failure_task_error/<client>``) or, with neither
    client nor domain, ``server_<metric>``.

    Parameters
    ----------
    history
        A run's history.
    after_round
        Only rounds after this one.
    """
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    per_domain: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list))
    for r in history.records:
        if r.round <= after_round or not math.isfinite(r.value):
            continue
        name = f"{r.phase}_{r.metric}"
        if r.phase in ("val", "test", "final_val") and r.domain:
            per_domain[(name, r.round)][r.domain].append(r.value)
            continue
        label = r.client or r.domain
        groups[(f"{name}/{label}" if label else name, r.round)].append(r.value)
    for (name, step), domains in per_domain.items():
        means = {d: sum(v) / len(v) for d, v in domains.items()}
        for domain, value in means.items():
            groups[(f"{name}/{domain}", step)].append(value)
        groups[(f"{name}/mean", step)].append(sum(means.values()) / len(means))
    return sorted((mlflow_key(name), sum(v) / len(v), step)
                  for (name, step), v in groups.items())


def results_metrics(results: Results, method: str, replicate: int, split: str, *,
                    domains: Iterable[str] | None = None) -> dict[str, float]:
    """One method's scored metrics per domain in one replicate: the mean over its clients
    and evaluation seeds, as ``{"<split>_auc/<domain>": value, "<split>_auc/mean": ...}``
    (``domains``: only these)."""
    wanted = set(domains) if domains is not None else None
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in results.rows:
        if (row.method == method and row.replicate == replicate
                and (wanted is None or row.domain in wanted) and math.isfinite(row.value)):
            cells[(row.metric, row.domain)].append(row.value)
    out: dict[str, float] = {}
    by_metric: dict[str, list[float]] = defaultdict(list)
    for (metric, domain), values in sorted(cells.items()):
        value = sum(values) / len(values)
        out[mlflow_key(f"{split}_{metric}/{domain}")] = value
        by_metric[metric].append(value)
    for metric, values in by_metric.items():
        out[mlflow_key(f"{split}_{metric}/mean")] = sum(values) / len(values)
    return out


def default_tracking_uri(storage: Storage) -> str:
    """``sqlite:///<run dir>/mlflow.db``: the store inside a local run folder."""
    if not storage.is_local:
        raise ValueError(f"run.tracking_uri: the default MLflow store lives inside the run "
                         f"folder and needs a local one, {storage.uri} is not; give "
                         f"run.tracking_uri (e.g. an MLflow server http://host:5000)")
    return f"sqlite:///{storage.path(DB_FILE)}"


def check_tracking(cfg: ExperimentConfig, storage: Storage) -> None:
    """Raise ``ValueError`` when ``run.tracking`` cannot work for this run folder (before
    anything starts)."""
    if cfg.run.tracking == "mlflow" and cfg.run.tracking_uri is None:
        default_tracking_uri(storage)


# -- the study's MLflow runs ------------------------------------------------------------------
class StudyTracker:
    """The MLflow runs of one study, kept in step with its run folder.

    Parameters
    ----------
    cfg
        The experiment as it runs.
    saved
        The experiment as saved (no machine paths): its flattened form is the params.
    storage
        The run folder (``tracking.json`` lives there).
    """

    def __init__(self, cfg: ExperimentConfig, saved: ExperimentConfig, storage: Storage
                 ) -> None:
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.storage = storage
        state = (json.loads(storage.read_text(TRACKING_FILE))
                 if storage.exists(TRACKING_FILE) else {})
        self.uri = state.get("tracking_uri") or cfg.run.tracking_uri \
            or default_tracking_uri(storage)
        self.client: MlflowClient = MlflowClient(self.uri)
        if state:
            self.experiment_id = state["experiment_id"]
            self.parent = state["parent_run_id"]
            self.nested: dict[str, str] = dict(state.get("nested", {}))
            self.logged: list[str] = list(state.get("logged", []))
            self.finishes = int(state.get("finishes", 0))
            self.client.update_run(self.parent, status="RUNNING")
            self.client.set_tag(self.parent, "umim.resumed_at", str(time.time()))
            logger.info("MLflow: continuing run %s at %s", self.parent, self.uri)
        else:
            self.experiment_id = self._experiment(cfg.run.tracking_experiment or cfg.name)
            run = self.client.create_run(self.experiment_id, run_name=cfg.name, tags={
                "umim.run_dir": storage.uri, "umim.strategy": cfg.strategy.name})
            self.parent = run.info.run_id
            self.nested, self.logged, self.finishes = {}, [], 0
            self._log(self.parent, params=flatten_params(to_dict(saved)))
            self._save()
            logger.info("MLflow: run %s in experiment %s at %s", self.parent,
                        self.experiment_id, self.uri)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if self.uri.startswith("sqlite:///") and self.storage.is_local:
            location = Path(self.storage.path(ARTIFACTS_DIR)).as_uri()
        return str(self.client.create_experiment(name, artifact_location=location))

    def _save(self) -> None:
        self.storage.write_text(TRACKING_FILE, json.dumps({
            "tracking_uri": self.uri, "experiment_id": self.experiment_id,
            "parent_run_id": self.parent, "nested": self.nested, "logged": self.logged,
            "finishes": self.finishes}, indent=2))

    def _log(self, run_id: str, *, metrics: Iterable[tuple[str, float, int]] = (),
             params: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(s))
                                               for k, v, s in metrics],
                              params=[Param(k, v) for k, v in (params or {}).items()])

    def _nested(self, key: str, run_name: str, tags: Mapping[str, str],
                params: Mapping[str, Any] | None = None) -> str:
        if key in self.nested:  # begun but never finished (a crash while it was logged):
            self.client.delete_run(self.nested.pop(key))  # begin it again, no value twice
        if key not in self.nested:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
                "mlflow.parentRunId": self.parent, "umim.step": key, **tags})
            self.nested[key] = run.info.run_id
            self._save()
            if params:
                self._log(self.nested[key], params=flatten_params(params))
        return self.nested[key]

    def _finish_nested(self, key: str) -> None:
        self.client.set_terminated(self.nested[key], status="FINISHED")
        self.logged.append(key)
        self._save()

    # -- what the study calls ------------------------------------------------------------
    def sync(self, replicate: int, count: int, seed: int, folder: Storage) -> None:
        """Log every step of replicate ``replicate`` (of ``count``) that is done and not
        logged yet, from the files of its run folder ``folder``.

        Parameters
        ----------
        replicate, count
            The replicate's index and how many the study has.
        seed
            The replicate's seed (its baselines' seed unless ``evaluation.baseline_seeds``).
        folder
            The replicate's run folder (the study's own with one replicate).
        """
        cfg, ev = self.cfg, self.cfg.evaluation

        def done(step: str) -> str | None:
            name = replicate_step(step, replicate, count)
            return (name if name not in self.logged
                    and self.storage.exists(f"progress/{name}.done") else None)

        tags = {"umim.replicate": str(replicate)}
        results: Results | None = None
        if (step := done("main")) is not None:
            self._federated(step, cfg.strategy.name, folder, tags,
                            {"strategy": to_dict(cfg)["strategy"], "seed": seed})
        for name in ev.baselines:
            for k in ev.baseline_seeds or (seed,):
                if (step := done(f"baseline-{name}-seed{k}")) is not None:
                    rounds = cfg.baseline_rounds(name)
                    strategy = to_dict(ev.baseline_strategy(name, rounds))
                    self._federated(step, name, Storage(f"{folder.uri}/baselines/"
                                                        f"{name}-seed{k}"),
                                    tags, {"strategy": strategy, "seed": k})
        modes = [(m, f) for m in ev.modes for f in ev.label_fractions]
        steps = [(s, m, f) for m, f in modes if (s := done(step_name(m, f))) is not None]
        lodo = [(s, d) for d in ev.lodo_domains if (s := done(f"lodo-{d}")) is not None]
        if steps or lodo:
            results = Results.from_parquet_bytes(self.storage.read_bytes(RESULTS))
        for step, mode, fraction in steps:
            assert results is not None
            for arm in ev.encoders:
                method = method_name(encoder_label(cfg, arm), mode, fraction)
                key = f"{step}:{method}"
                if key in self.logged:
                    continue
                run_id = self._nested(key, method, {**tags, "umim.method": method},
                                      {"mode": mode, "label_fraction": fraction,
                                       "encoder": arm})
                metrics = results_metrics(results, method, replicate, ev.split)
                self._log(run_id, metrics=[(k, v, 0) for k, v in metrics.items()])
                self._finish_nested(key)
            self.logged.append(step)
        for step, domain in lodo:
            assert results is not None
            for mode, fraction in modes:
                for label in (lodo_label(cfg), base_label(cfg)):
                    method = f"lodo:{method_name(label, mode, fraction)}"
                    key = f"{step}:{method}"
                    if key in self.logged:
                        continue
                    run_id = self._nested(key, f"{method} ({domain} held out)",
                                          {**tags, "umim.method": method,
                                           "umim.held_out": domain},
                                          {"mode": mode, "label_fraction": fraction,
                                           "held_out": domain})
                    metrics = results_metrics(results, method, replicate, ev.split,
                                              domains=[domain])
                    self._log(run_id, metrics=[(k, v, 0) for k, v in metrics.items()])
                    self._finish_nested(key)
            self.logged.append(step)
        self._save()

    def _federated(self, step: str, method: str, folder: Storage,
                   tags: Mapping[str, str], params: Mapping[str, Any]) -> None:
        run_id = self._nested(step, step, {**tags, "umim.method": method}, params)
        history = History.from_parquet_bytes(folder.read_bytes(HISTORY))
        self._log(run_id, metrics=history_metrics(history))
        self._finish_nested(step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Log the study's final metrics and its report, ``summary.json`` and
        ``config.yaml`` as artefacts of the parent run, and end it."""
        from engine.records.report import write_report

        write_report(self.storage.uri)
        main = summary.get("methods", {}).get(self.cfg.strategy.name, {})
        metrics = {mlflow_key(f"{self.cfg.evaluation.split}_{metric}/{domain}"):
                   cell[metric]["mean"]
                   for domain, cell in main.items() for metric in ("auc", "acc")
                   if metric in cell and math.isfinite(cell[metric]["mean"])}
        # a resumed study that finishes again logs only the values that changed (step: how
        # many times it finished before), so a value is never logged twice
        before = self.client.get_run(self.parent).data.metrics
        self._log(self.parent, metrics=[(k, v, self.finishes) for k, v in metrics.items()
                                        if before.get(k) != v])
        with tempfile.TemporaryDirectory() as tmp:  # any run folder (local or remote)
            for name in self.storage.listdir(""):
                if name in REPORT_FILES or name.endswith(".png"):
                    Path(tmp, name).write_bytes(self.storage.read_bytes(name))
            self.client.log_artifacts(self.parent, tmp)
        self.client.set_terminated(self.parent, status="FINISHED")
        self.finishes += 1
        self._save()
        logger.info("MLflow: run %s finished (%s)", self.parent, self.uri)

    def fail(self, error: BaseException) -> None:
        """End the parent run as failed (``KILLED`` on an interrupt); a resume reopens it."""
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.parent, status=status)


def open_tracker(cfg: ExperimentConfig, saved: ExperimentConfig, storage: Storage
                 ) -> StudyTracker | None:
    """The study's tracker, or ``None`` when ``run.tracking`` is ``none``."""
    if cfg.run.tracking != "mlflow":
        return None
    return StudyTracker(cfg, saved, storage)


# -- sweeps ---------------------------------------------------------------------------------
def sweep_callback(base: Mapping[str, Any], folder: str | Path, sweep_name: str, *,
                   metric: str, time_attr: str) -> Any:
    """Ray Tune's ``MLflowLoggerCallback`` for a sweep whose base has ``run.tracking:
    mlflow`` (else ``None``): one MLflow run per trial in experiment
    ``run.tracking_experiment`` (default: the sweep's name), at ``run.tracking_uri``
    (default ``sqlite:///<sweep dir>/mlflow.db``).

    Each trial's params are its resolved config (the base with the sampled values,
    flattened as :func:`flatten_params`); its metrics are every round's objective and
    ``val_auc/<domain>`` with ``step`` = the round (the distillations' intermediate reports
    to ASHA are not logged).

    Parameters
    ----------
    base
        The trial base config as plain data.
    folder
        The sweep directory.
    sweep_name
        The sweep's name.
    metric, time_attr
        The names of the trial's objective and of its progress in rounds in its reports.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from engine.config import from_dict

    cfg = from_dict(ExperimentConfig, base)
    run = cfg.run
    if run.tracking != "mlflow":
        return None
    resolved_base = flatten_params(to_dict(cfg))  # every key, defaults included
    uri = run.tracking_uri or f"sqlite:///{Path(folder).resolve() / DB_FILE}"
    experiment = run.tracking_experiment or sweep_name
    artifacts = (Path(folder).resolve() / ARTIFACTS_DIR).as_uri()

    class TrialTracker(MLflowLoggerCallback):
        """One MLflow run per trial: the resolved config as params, the round reports as
        metrics with step = the round."""

        def setup(self, *args: Any, **kwargs: Any) -> None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)  # the artefacts beside the store, not in the cwd
            if uri.startswith("sqlite:///") and client.get_experiment_by_name(
                    experiment) is None:
                client.create_experiment(experiment, artifact_location=artifacts)
            super().setup(*args, **kwargs)

        def log_trial_start(self, trial: Any) -> None:
            if trial not in self._trial_runs:
                tags = {**self.tags, "trial_name": str(trial)}
                self._trial_runs[trial] = self.mlflow_util.start_run(
                    tags=tags, run_name=str(trial)).info.run_id
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            sampled = {k: v for k, v in trial.config.items() if not k.startswith("__")}
            resolved = dict(resolved_base)
            resolved.update({mlflow_key(k): _param_value(v) for k, v in sampled.items()})
            MlflowClient(uri).log_batch(self._trial_runs[trial],  # one batch, not one per key
                                        params=[Param(k, v) for k, v in resolved.items()])

        def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]
                             ) -> None:
            rounds = result.get("rounds_done")
            if rounds is None or result.get(time_attr) != float(rounds):
                return  # a distillation's intermediate report, not a round's
            metrics = {k: v for k, v in result.items()
                       if k == metric or k.startswith("val_auc/")}
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial],
                                         metrics_to_log=metrics, step=int(rounds))

    return TrialTracker(uri, experiment_name=experiment, tags={"umim.sweep": sweep_name})
