"""The sweep's driver: builds the ``Tuner`` (Optuna search, ASHA or FIFO) and runs it.

Each trial is :func:`engine.tune.trial.run_trial`; no Trainer object is ever handed to the
``Tuner``. The Optuna study lives in ``optuna.db`` from the first trial
(:class:`engine.tune.search.LiveOptunaSearch`), so ``optuna-dashboard`` can follow the
sweep; Tune checkpoints the searcher (which holds the study's trials by Tune trial id) with
its experiment state (``tune/``), so ``umim sweep --resume DIR`` continues without
re-running finished trials. The outputs are written by
:func:`engine.tune.outputs.write_outputs`; :func:`sweep` returns a
:class:`engine.tune.result.SweepResult` (Tune's ``ResultGrid`` and the summary).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from engine.cluster.resources import concurrent_trials
from engine.config import ExperimentConfig, from_dict, to_dict
from engine.config.loader import ConfigError
from engine.config.plugins import Plugins
from engine.tune.names import METRIC, TIME_ATTR, study_url
from engine.tune.outputs import write_outputs
from engine.tune.result import SweepResult
from engine.tune.schema import SweepConfig, get_dotted, load_sweep
from engine.tune.space import tune_space
from engine.tune.trial import run_trial

logger = logging.getLogger(__name__)


def _sweep_dir(sweep: SweepConfig, out: str | os.PathLike[str] | None) -> Path:
    return Path(out) if out is not None else Path(sweep.storage_path) / sweep.name


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _tuner(sweep: SweepConfig, base: Mapping[str, Any], folder: Path, *,
           restore: bool, paths: Mapping[str, str] | None = None, verbose: int = 1) -> Any:
    """A new ``tune.Tuner`` for the sweep, or (``restore``) the one saved under ``folder``.

    Parameters
    ----------
    sweep
        The sweep.
    base
        The trial base config as plain data.
    folder
        The sweep directory; Tune's experiment goes to ``folder/tune/<name>``.
    restore
        Continue the saved experiment: finished trials are kept, errored ones are not rerun.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from engine.cluster.connect import alive_nodes
    from engine.tune.search import LiveOptunaSearch

    cfg = from_dict(ExperimentConfig, base)
    concurrent = sweep.search.max_concurrent_trials or concurrent_trials(cfg, alive_nodes())
    # The trial itself mostly waits on its actors and Train workers: it takes no CPU slot
    # (a bundle must not be empty, so it asks for a sliver of memory instead).
    # The driver's registered strategies, encoders and sources reach every trial.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plugins=Plugins.capture()),
                                    {"memory": 64 * 1024**2})
    if restore:
        logger.info("resuming the sweep in %s", folder)
        return tune.Tuner.restore(str(folder / "tune" / sweep.name), trainable,
                                  resume_unfinished=True, resume_errored=False)
    # The study lives in optuna.db (live for optuna-dashboard); the searcher, which maps Tune
    # trials to the study's trials, is checkpointed with the experiment state.
    default = {k: get_dotted(base, k) for k in sweep.space}
    points = ([default] if sweep.search.include_default else []) + [
        {**default, **p} for p in sweep.search.points_to_evaluate]
    rounds = cfg.planned_rounds()
    searcher = LiveOptunaSearch(folder, study_name=sweep.name, rounds=rounds,
                                seed=sweep.search.seed, points_to_evaluate=points or None)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max",
                               max_t=max(rounds, 1), grace_period=sweep.search.grace_period,
                               reduction_factor=sweep.search.reduction_factor,
                               stop_last_trials=False)
                 if sweep.search.scheduler == "asha" else FIFOScheduler())
    param_space = {**tune_space(sweep.space),
                   "__sweep": {"base": dict(base), "dir": str(folder),
                               "paths": dict(paths or {})}}
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
                                  callbacks=_tracking_callbacks(base, folder, sweep.name),
                                  verbose=verbose))


def _tracking_callbacks(base: Mapping[str, Any], folder: Path, name: str) -> list[Any]:
    """MLflow's Tune callback when the base has ``run.tracking: mlflow``
    (:func:`engine.run.tracking.sweep_callback`), else none."""
    from engine.run.tracking import sweep_callback

    callback = sweep_callback(base, folder, name, metric=METRIC, time_attr=TIME_ATTR)
    return [callback] if callback is not None else []


def sweep(sweep_file: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
          *, out: str | os.PathLike[str] | None = None,
          resume: str | os.PathLike[str] | None = None,
          data_root: str | None = None, cache_dir: str | None = None,
          address: str | None = None, quiet: bool = False) -> SweepResult:
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
    data_root, cache_dir
        Override the experiment's ``data.data_root`` / ``data.cache_dir`` on this machine
        (kept in ``sweep.yaml`` for a resume, never in a trial's or the best config).
    address
        The Ray cluster to join (else the experiment's ``run.address``, else
        ``$RAY_ADDRESS``, else a local Ray).
    quiet
        No Tune progress table.

    Returns
    -------
    SweepResult
        Tune's ``ResultGrid`` (``result.grid``; ``result.get_dataframe()`` is its DataFrame),
        the summary (``result.summary``: best trial, its parameters and objective, counts by
        state) and the study's URL (``result.study_url``, ``result.load_study()``).
    """
    from engine.cluster.connect import connect
    from engine.run.session import machine_paths

    if resume is not None:
        folder = Path(resume).resolve()
        if not (folder / "sweep.yaml").is_file():
            raise ConfigError(f"{folder} holds no sweep.yaml: not a sweep directory")
        saved = yaml.safe_load((folder / "sweep.yaml").read_text())
        sweep_cfg = from_dict(SweepConfig, saved["sweep"])
        base = saved["base"]
        paths = machine_paths(from_dict(ExperimentConfig, base), data_root, cache_dir) \
            if data_root or cache_dir or "paths" not in saved else saved["paths"]
    else:
        if sweep_file is None:
            raise ConfigError("give a sweep file or --resume DIR")
        sweep_cfg, base = load_sweep(sweep_file, overrides)
        paths = machine_paths(from_dict(ExperimentConfig, base), data_root, cache_dir)
        folder = _sweep_dir(sweep_cfg, out).resolve()
        if (folder / "sweep.yaml").exists():
            raise ConfigError(f"{folder} already holds a sweep; use --resume {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        # the base stays as written (portable); this machine's folders are kept apart
        (folder / "sweep.yaml").write_text(yaml.safe_dump(
            {"sweep": to_dict(sweep_cfg), "base": base, "paths": paths}, sort_keys=False))
    # Save Tune's experiment state (and the searcher's study) at least every second, so a
    # trial that finished before a crash is known as finished when the sweep resumes.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    connect(address or from_dict(ExperimentConfig, base).run.address)
    tuner = _tuner(sweep_cfg, base, folder, restore=resume is not None, paths=paths,
                   verbose=0 if quiet else 1)
    grid = tuner.fit()
    summary = write_outputs(folder, sweep_cfg, base, grid)
    return SweepResult(grid=grid, summary=summary, dir=str(folder), study_url=study_url(folder),
                       study_name=sweep_cfg.name)
