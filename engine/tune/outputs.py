"""What a finished (or resumed and finished) sweep leaves in its directory.

``trials.parquet`` (one row per trial: params, metrics, state, error), ``best.yaml`` (a
config ``umim run`` accepts), ``objective.png``, ``importance.png`` / ``importance.json``
(fANOVA on the live Optuna study in ``optuna.db``, see :mod:`engine.tune.search`) and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from engine.config import ExperimentConfig, from_dict, to_dict
from engine.tune.names import CHANCE_AUC, METRIC, study_url
from engine.tune.schema import SweepConfig, get_dotted, trial_config
from engine.tune.space import optuna_distributions

logger = logging.getLogger(__name__)


def write_outputs(folder: Path, sweep_cfg: SweepConfig, base: Mapping[str, Any],
                  grid: Any) -> dict[str, Any]:
    """``trials.parquet``, ``best.yaml``, plots and ``summary.json`` of a finished sweep.

    Parameters
    ----------
    folder
        The sweep directory.
    sweep_cfg
        The sweep.
    base
        The trial base config as plain data.
    grid
        Tune's ``ResultGrid`` (any iterable of results with ``metrics``, ``config``,
        ``path`` and ``error``).

    Returns
    -------
    dict
        The summary: trials by state (``completed``: reached the planned rounds,
        ``stopped``: by ASHA, ``failed``), and the best completed trial, its parameters and
        objective, and how much it beat the default config's trial when there is one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = from_dict(ExperimentConfig, base)
    rounds = cfg.planned_rounds()
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
    # every row gets every column (from_pylist would keep only the first row's keys: a
    # failed or stopped first trial would drop the domains it never scored)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: (str(v) if isinstance(v, list | dict) else v)
                                   for k, v in ((k, r.get(k)) for k in columns)}
                                  for r in rows])
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
        default_params = {k: get_dotted(base, k) for k in params}
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
    """Equal, with numbers compared up to rounding (a sampled float vs the YAML's)."""
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _plots(folder: Path, rows: list[dict[str, Any]], sweep_cfg: SweepConfig) -> None:
    """``objective.png``, ``importance.png`` and ``importance.json``."""
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
    ax.set_ylabel("objective: mean val AUC, all domains")
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
    """Rank the parameters on the sweep's Optuna study (fANOVA over its completed trials).

    The study is the live one the searcher wrote; a trial still ``RUNNING`` in it once the
    sweep is over was lost by a driver killed between asking for it and saving its state,
    and is marked ``FAIL``. A sweep directory from before studies were live has none: its
    trials are exported to ``optuna.db`` first.
    """
    import optuna

    url = study_url(folder)
    try:
        study = optuna.load_study(study_name=sweep_cfg.name, storage=url)
    except KeyError:
        logger.warning("%s holds no live study %r (an older sweep): exporting the trials",
                       url, sweep_cfg.name)
        study = _export(folder, sweep_cfg, rows)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        logger.warning("Optuna trial %d was left running by a killed driver: marked failed",
                       trial.number)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as err:
        logger.warning("parameter importance unavailable: %s", err)
        return {}


def _export(folder: Path, sweep_cfg: SweepConfig, rows: list[dict[str, Any]]) -> Any:
    """The trials as a new Optuna study in ``optuna.db`` (for sweeps without a live one)."""
    import optuna

    path = folder / "optuna.db"
    path.unlink(missing_ok=True)
    study = optuna.create_study(study_name=sweep_cfg.name, direction="maximize",
                                storage=study_url(folder))
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
    return study
