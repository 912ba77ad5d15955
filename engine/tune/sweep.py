"""Sweeps: Ray Tune + Optuna over the universal strategy's knobs.

Each trial is a Tune *function trainable* that builds the experiment from the base config
plus the sampled values, starts its client actors, and runs the universal rounds; every
distillation is a Ray Train ``TorchTrainer`` whose reports reach Tune through
``TuneReportCallback`` (so ASHA sees intermediate results), and every round reports the
objective: the mean over domains of the federated validation AUC of the global model.
No Trainer object is ever handed to the ``Tuner``.

Outputs in the sweep directory: ``trials.parquet`` (one row per trial: params, metrics,
state, error), ``best.yaml`` (a config ``umim run`` accepts), ``objective.png``,
``importance.png``, the Optuna study (``optuna.db``) and Tune's experiment (``tune/``),
from which ``umim sweep --resume DIR`` continues without re-running finished trials.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from engine.cluster.resources import ResourceError
from engine.config import ExperimentConfig, from_dict, to_dict
from engine.config.loader import ConfigError, apply_overrides, load_yaml, set_dotted
from engine.tune.space import (
    check_keys,
    check_point,
    optuna_distributions,
    tune_space,
    validate_space,
)
from strategies.universal import plan_stages

logger = logging.getLogger(__name__)

METRIC = "val_auc"
TIME_ATTR = "progress"
CHANCE_AUC = 0.5
"""The objective reported before a trial has a global model to score: chance level."""


@dataclass(frozen=True)
class SearchConfig:
    """How trials are drawn, scheduled and run in parallel.

    Attributes
    ----------
    num_samples
        Number of trials.
    seed
        Seed of Optuna's sampler (TPE).
    max_concurrent_trials
        Trials at once; ``None`` derives it from the resources one trial needs (its client
        actors and Train workers) and the cluster's size.
    scheduler
        ``asha`` (early stopping on the objective) or ``none``.
    grace_period, reduction_factor
        ASHA's first milestone (in rounds) and halving rate.
    include_default
        Make the first trial the base experiment's own values, so the summary can say how
        much the best trial beat the default config.
    points_to_evaluate
        Configurations to run next (after the default), before the sampler draws: each maps
        some keys of the space to values; the other keys keep the base experiment's value.
    """

    num_samples: int = 20
    seed: int = 0
    max_concurrent_trials: int | None = None
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: float = 1.0
    reduction_factor: float = 2.0
    include_default: bool = True
    points_to_evaluate: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("search.num_samples must be >= 1")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError("search.max_concurrent_trials must be >= 1")
        fixed = int(self.include_default) + len(self.points_to_evaluate)
        if fixed > self.num_samples:
            raise ValueError(f"search.num_samples ({self.num_samples}) is smaller than the "
                             f"{fixed} configurations given to evaluate first")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: base experiment, fixed overrides, search space and search settings.

    ``experiment`` is a path relative to the sweep file (or absolute). Trials run the base
    experiment's main strategy only (evaluation extras are switched off) with client
    updates cached across trials (``run.cache_fits``).
    """

    name: str = "sweep"
    experiment: str = "../quickstart.yaml"
    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    space: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    search: SearchConfig = field(default_factory=SearchConfig)
    storage_path: str = "runs/sweeps"


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()
               ) -> tuple[SweepConfig, dict[str, Any]]:
    """Read a sweep file (plus dotted overrides) and build the trials' base experiment.

    Returns the sweep config and the trial base config as plain data.
    """
    path = Path(path)
    sweep = from_dict(SweepConfig, apply_overrides(load_yaml(path), overrides))
    if not sweep.space:
        raise ConfigError(f"{path}: the sweep has an empty space")
    check_keys(sweep.space, ExperimentConfig)
    validate_space(sweep.space)
    for i, point in enumerate(sweep.search.points_to_evaluate):
        check_point(sweep.space, point, f"search.points_to_evaluate[{i}]")
    experiment = Path(sweep.experiment)
    if not experiment.is_absolute():
        experiment = (path.parent / experiment).resolve()
    base = load_yaml(experiment)
    for key, value in sweep.overrides.items():
        set_dotted(base, key, copy.deepcopy(value))
    set_dotted(base, "evaluation", {"finetune_epochs": 0, "lodo_domains": [], "baselines": []})
    set_dotted(base, "run.cache_fits", True)
    from_dict(ExperimentConfig, base)  # the base itself must be valid
    return sweep, base


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment of one trial: the base with the sampled values set."""
    data = copy.deepcopy(dict(base))
    for key, value in params.items():
        set_dotted(data, key, value)
    return from_dict(ExperimentConfig, data)


def trial_resources(cfg: ExperimentConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds at its peak: its client actors plus its Train workers.

    Ray does not reserve the Train workers of a Tune trial, so the sweep reserves them by
    limiting how many trials run at once.
    """
    clients = len(cfg.data.domains) * cfg.data.clients_per_domain
    actors = min(cfg.clients.num_actors or clients, clients)
    d = cfg.distill
    cpu = actors * cfg.clients.num_cpus + d.num_workers * d.cpus_per_worker
    gpu = actors * cfg.clients.num_gpus + (d.num_workers * d.gpus_per_worker if d.use_gpu else 0)
    p = cfg.pretrain
    if p.method == "mim":
        cpu = max(cpu, p.num_workers * p.cpus_per_worker)
        gpu = max(gpu, p.num_workers * p.gpus_per_worker if p.use_gpu else 0.0)
    return cpu, gpu


def concurrent_trials(cfg: ExperimentConfig, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many trials fit on the cluster at once (fails fast when not even one does)."""
    cpu, gpu = trial_resources(cfg)
    total_cpu = sum(float(n.get("CPU", 0)) for n in nodes)
    total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
    fits = math.floor(total_cpu / cpu + 1e-9) if cpu > 0 else 10**6
    if gpu > 0:
        fits = min(fits, math.floor(total_gpu / gpu + 1e-9))
    if fits < 1:
        raise ResourceError(
            f"one sweep trial needs {cpu:g} CPU and {gpu:g} GPU (client actors + Train "
            f"workers) but the cluster has {total_cpu:g} CPU and {total_gpu:g} GPU. Lower "
            "clients.num_actors / num_cpus / num_gpus or distill.num_workers in the sweep's "
            "overrides.")
    return fits


def planned_rounds(cfg: ExperimentConfig) -> int:
    """Rounds of a trial's run: the universal strategy's stages (as it plans them, explicit
    ``strategy.stages`` included) x rounds per stage, else ``strategy.rounds``."""
    if cfg.strategy.name != "universal":
        return cfg.strategy.rounds
    stages = plan_stages(cfg.data.domains, cfg.strategy.stages, cfg.strategy.num_stages)
    return len(stages) * cfg.strategy.rounds_per_stage


# -- inside a trial ---------------------------------------------------------------------------
def _round_reporter() -> Any:
    from ray import tune

    from engine.fl.simulation import Callback, Simulation

    class RoundReporter(Callback):
        """Reports the objective to Tune after every round's federated validation."""

        def __init__(self) -> None:
            self.last = CHANCE_AUC
            self.round = 0

        def on_round_end(self, sim: Simulation, server_round: int) -> None:
            per_domain = sim.val_auc(server_round)
            if per_domain:
                self.last = sum(per_domain.values()) / len(per_domain)
            self.round = server_round
            tune.report({METRIC: self.last, TIME_ATTR: float(server_round),
                         "rounds_done": server_round,
                         **{f"val_auc/{d}": v for d, v in per_domain.items()}})

    return RoundReporter()


def _distill_callbacks(reporter: Any) -> Any:
    from ray.tune.integration.ray_train import TuneReportCallback

    class DistillReportCallback(TuneReportCallback):
        """``TuneReportCallback`` that adds the objective so far and the trial's progress
        (rounds done plus the distillation's fraction) to each Train report."""

        def __init__(self, objective: float, server_round: int, steps: int) -> None:
            super().__init__()
            self.extra = {"objective": objective, "round": server_round, "steps": steps}

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            first = dict(metrics[0])
            extra = self.extra
            first.update({METRIC: extra["objective"], "rounds_done": extra["round"] - 1,
                          # below the round's own milestone, which its validation reaches
                          TIME_ATTR: extra["round"] - 1
                          + first.get("step", 0) / (extra["steps"] + 1)})
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    def make(request: Any) -> list[Any]:
        return [DistillReportCallback(reporter.last, request.server_round or reporter.round + 1,
                                      request.settings.steps)]

    return make


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one experiment with the sampled values."""
    from ray import tune

    from engine.fl.simulation import Simulation
    from engine.records.storage import Storage
    from engine.run.session import Session

    meta = config["__sweep"]
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    trial_id = tune.get_context().get_trial_id()
    marker = Path(meta["dir"], "invocations", f"{trial_id}.{uuid.uuid4().hex[:8]}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": params, "time": time.time()}, default=str))
    cfg = trial_config(meta["base"], params)
    storage = Storage(Path(tune.get_context().get_trial_dir()) / "run")
    storage.write_text("config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    session = Session(cfg, pooled=cfg.strategy.name == "centralised").start()
    try:
        reporter = _round_reporter()
        sim = Simulation(cfg, storage, session.actors, session.base,
                         distiller=session.distiller(storage, _distill_callbacks(reporter)),
                         quiet=True, callbacks=[reporter])
        sim.run()
    finally:
        session.shutdown()
    marker.with_suffix(marker.suffix + ".done").write_text(str(time.time()))


# -- the driver -------------------------------------------------------------------------------
def _sweep_dir(sweep: SweepConfig, out: str | os.PathLike[str] | None) -> Path:
    return Path(out) if out is not None else Path(sweep.storage_path) / sweep.name


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _tuner(sweep: SweepConfig, base: Mapping[str, Any], folder: Path, *,
           restore: bool) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from engine.cluster.connect import alive_nodes

    cfg = from_dict(ExperimentConfig, base)
    concurrent = sweep.search.max_concurrent_trials or concurrent_trials(cfg, alive_nodes())
    # The trial itself mostly waits on its actors and Train workers: it takes no CPU slot
    # (a bundle must not be empty, so it asks for a sliver of memory instead).
    trainable = tune.with_resources(run_trial, {"memory": 64 * 1024**2})
    if restore:
        logger.info("resuming the sweep in %s", folder)
        return tune.Tuner.restore(str(folder / "tune" / sweep.name), trainable,
                                  resume_unfinished=True, resume_errored=False)
    # The study lives in the searcher, which Tune checkpoints with the experiment state, so
    # both always agree on which trials finished; write_outputs exports the trials to optuna.db.
    default = {k: _get(base, k) for k in sweep.space}
    points = ([default] if sweep.search.include_default else []) + [
        {**default, **p} for p in sweep.search.points_to_evaluate]
    searcher = OptunaSearch(metric=METRIC, mode="max", seed=sweep.search.seed,
                            study_name=sweep.name, points_to_evaluate=points or None)
    rounds = planned_rounds(cfg)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max",
                               max_t=max(rounds, 1), grace_period=sweep.search.grace_period,
                               reduction_factor=sweep.search.reduction_factor,
                               stop_last_trials=False)
                 if sweep.search.scheduler == "asha" else FIFOScheduler())
    param_space = {**tune_space(sweep.space),
                   "__sweep": {"base": dict(base), "dir": str(folder)}}
    logger.info("sweep %s: %d trials, %d at once", sweep.name, sweep.search.num_samples,
                concurrent)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=sweep.search.num_samples,
                                    max_concurrent_trials=concurrent,
                                    # a fresh process per trial, so a stopped trial's client
                                    # actors and Train workers die with it
                                    reuse_actors=False,
                                    trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(folder / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0,
                                                                    fail_fast=False),
                                  verbose=1))


def sweep(sweep_file: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
          *, out: str | os.PathLike[str] | None = None,
          resume: str | os.PathLike[str] | None = None,
          data_root: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep and write its outputs.

    Parameters
    ----------
    sweep_file
        The sweep YAML (e.g. ``experiments/sweeps/universal.yaml``); not needed to resume.
    overrides
        Dotted overrides of the sweep file (``search.num_samples=8``,
        ``overrides.distill.steps=100``).
    out
        Sweep directory (default ``<storage_path>/<name>``).
    resume
        A sweep directory to continue: finished trials are kept, the rest run.
    data_root
        Overrides the experiment's ``data.data_root``.

    Returns
    -------
    dict
        The summary: best trial, its parameters and objective, counts by state.
    """
    from engine.cluster.connect import connect

    if resume is not None:
        folder = Path(resume).resolve()
        saved = yaml.safe_load((folder / "sweep.yaml").read_text())
        sweep_cfg = from_dict(SweepConfig, saved["sweep"])
        base = saved["base"]
    else:
        if sweep_file is None:
            raise ConfigError("give a sweep file or --resume DIR")
        sweep_cfg, base = load_sweep(sweep_file, overrides)
        from engine.run.session import resolve_paths

        resolved = resolve_paths(from_dict(ExperimentConfig, base), data_root)
        base = to_dict(resolved)
        folder = _sweep_dir(sweep_cfg, out).resolve()
        if (folder / "sweep.yaml").exists():
            raise ConfigError(f"{folder} already holds a sweep; use --resume {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.yaml").write_text(yaml.safe_dump(
            {"sweep": to_dict(sweep_cfg), "base": base}, sort_keys=False))
    # Save Tune's experiment state (and the searcher's study) at least every second, so a
    # trial that finished before a crash is known as finished when the sweep resumes.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    connect(from_dict(ExperimentConfig, base).run.address)
    tuner = _tuner(sweep_cfg, base, folder, restore=resume is not None)
    grid = tuner.fit()
    return write_outputs(folder, sweep_cfg, base, grid)


def write_outputs(folder: Path, sweep_cfg: SweepConfig, base: Mapping[str, Any],
                  grid: Any) -> dict[str, Any]:
    """``trials.parquet``, ``best.yaml``, plots and ``summary.json`` of a finished sweep."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = from_dict(ExperimentConfig, base)
    rounds = planned_rounds(cfg)
    invoked = _invocation_params(folder)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        params = {k: v for k, v in (result.config or {}).items() if not k.startswith("__")}
        if not params:  # Tune may not restore the config of a trial that errored earlier
            params = invoked.get(trial_id, {})
        reached = int(metrics.get("rounds_done", 0) or 0)
        if result.error is not None:
            state = "failed"
        elif reached >= rounds:
            state = "completed"
        else:
            state = "stopped"
        rows.append({"trial_id": trial_id,
                     "state": state, "objective": metrics.get(METRIC) if state != "failed"
                     else None, "rounds_done": reached,
                     "error": None if result.error is None else str(result.error)[:2000],
                     "start": metrics.get("date"),
                     **{f"param:{k}": v for k, v in params.items()},
                     **{k: v for k, v in metrics.items() if k.startswith("val_auc/")}})
    rows.sort(key=lambda r: r["trial_id"])
    table = pa.Table.from_pylist([{k: (str(v) if isinstance(v, list | dict) else v)
                                   for k, v in r.items()} for r in rows])
    pq.write_table(table, folder / "trials.parquet")
    done = [r for r in rows if r["state"] == "completed" and r["objective"] is not None]
    best = max(done, key=lambda r: r["objective"]) if done else None
    summary: dict[str, Any] = {"name": sweep_cfg.name, "trials": len(rows),
                               "states": {s: sum(r["state"] == s for r in rows)
                                          for s in ("completed", "stopped", "failed")}}
    if best is not None:
        params = {k[6:]: v for k, v in best.items() if k.startswith("param:")}
        best_cfg = trial_config(base, params)
        (folder / "best.yaml").write_text(yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
        default_params = {k: _get(base, k) for k in params}
        summary.update({"best_trial": best["trial_id"], "best_objective": best["objective"],
                        "best_params": params, "default_params": default_params})
        for r in done:
            values = {k[6:]: v for k, v in r.items() if k.startswith("param:")}
            if all(_same(values.get(k), v) for k, v in default_params.items()):
                summary["default_trial"] = r["trial_id"]
                summary["default_objective"] = r["objective"]
                summary["best_minus_default"] = best["objective"] - r["objective"]
                break
    _plots(folder, rows, sweep_cfg)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _invocation_params(folder: Path) -> dict[str, dict[str, Any]]:
    """trial id -> the sampled values, from the markers every trial writes when it starts."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((folder / "invocations").glob("*")):
        if not path.name.endswith(".done"):
            out[path.name.split(".")[0]] = json.loads(path.read_text())["params"]
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _get(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def _plots(folder: Path, rows: list[dict[str, Any]], sweep_cfg: SweepConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    best, xs, ys, bests = -math.inf, [], [], []
    for i, r in enumerate(rows):
        if r["objective"] is None:
            ax.scatter([i], [CHANCE_AUC], marker="x", color="red")
            continue
        color = {"completed": "tab:blue", "stopped": "tab:orange"}[r["state"]]
        ax.scatter([i], [r["objective"]], color=color)
        if r["state"] == "completed":
            best = max(best, r["objective"])
        xs.append(i)
        ys.append(r["objective"])
        bests.append(best if best > -math.inf else None)
    ax.plot(xs, [b if b is not None else math.nan for b in bests], color="k", lw=1,
            label="best completed")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean val AUC (global model)")
    ax.set_title(f"{sweep_cfg.name}: objective (blue done, orange stopped, x failed)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(folder / "objective.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    importance = _importance(folder, sweep_cfg, rows)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(len(importance), 1)))
    if importance:
        names = list(importance)
        ax.barh(names, [importance[n] for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("importance (Optuna fANOVA)")
    else:
        ax.text(0.5, 0.5, "too few completed trials for parameter importance",
                ha="center", va="center")
        ax.set_axis_off()
    fig.savefig(folder / "importance.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (folder / "importance.json").write_text(json.dumps(importance, indent=2))


def _importance(folder: Path, sweep_cfg: SweepConfig, rows: list[dict[str, Any]]
                ) -> dict[str, float]:
    """Export the trials to an Optuna study in ``optuna.db`` and rank the parameters."""
    import optuna

    path = folder / "optuna.db"
    path.unlink(missing_ok=True)
    study = optuna.create_study(study_name=sweep_cfg.name, direction="maximize",
                                storage=f"sqlite:///{path}")
    distributions = optuna_distributions(sweep_cfg.space)
    states = {"completed": optuna.trial.TrialState.COMPLETE,
              "stopped": optuna.trial.TrialState.PRUNED,
              "failed": optuna.trial.TrialState.FAIL}
    for r in rows:
        params = {k[6:]: v for k, v in r.items() if k.startswith("param:")}
        params = {k: v for k, v in params.items() if k in distributions}
        try:
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: distributions[k] for k in params},
                value=r["objective"] if r["state"] == "completed" else None,
                state=states[r["state"]], user_attrs={"trial_id": r["trial_id"]}))
        except ValueError as err:  # e.g. a value outside the declared range
            logger.warning("trial %s not exported to optuna.db: %s", r["trial_id"], err)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as err:
        logger.warning("parameter importance unavailable: %s", err)
        return {}
