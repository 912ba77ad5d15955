"""Connecting to Ray: a local cluster, or an existing one via ``RAY_ADDRESS`` / ``--address``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import ray

from engine.config import ExperimentConfig

logger = logging.getLogger(__name__)


LOCAL_ENV = {
    # Ray Train's controller polls its workers every 2 s by default; a local simulation runs
    # many short Train jobs (one per distillation), so poll faster.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def driver_paths() -> list[str]:
    """The driver's ``sys.path`` entries outside the interpreter's own folders (the working
    directory, a notebook's folder, test folders, ...): where user modules named by import
    path (``model.arch: mypkg.nets:make_encoder``) are found."""
    own = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if os.path.isdir(path) and not any(path == o or path.startswith(o + os.sep)
                                           for o in own) and path not in out:
            out.append(path)
    return out


def use_local_env() -> None:
    """Set :data:`LOCAL_ENV` (unless already set) before a local Ray starts, and put the
    driver's own import folders (:func:`driver_paths`) on ``PYTHONPATH``: a local Ray's
    processes (client actors, Train workers, Tune trials) inherit the environment, so they
    import what the driver imports."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    extra = [p for p in driver_paths() if p not in current]
    if extra:
        os.environ["PYTHONPATH"] = os.pathsep.join([*current, *extra])


def connect(address: str | None = None, *, dashboard: bool = True) -> None:
    """Initialise Ray once: join ``address`` (or ``$RAY_ADDRESS``), else start locally.

    Parameters
    ----------
    address
        A running cluster to join; ``None``: ``$RAY_ADDRESS``, else a local Ray.
    dashboard
        Start the dashboard with a local Ray. Ray Train needs it (its placement-group
        cleaner queries the State API the dashboard serves); plain federated rounds do not,
        and skipping it saves seconds of start-up (measured 13.9 s vs 6.8 s on 2 cores).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        use_local_env()
        with warnings.catch_warnings():  # a note about a future default we already rely on
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
                                    category=FutureWarning)
            ray.init(log_to_driver=True, include_dashboard=dashboard)


def connect_for(cfg: ExperimentConfig) -> None:
    """:func:`connect` as ``cfg.run`` says (the dashboard only where Ray Train needs it)."""
    dashboard = cfg.run.dashboard
    connect(cfg.run.address, dashboard=cfg.runs_train_jobs if dashboard is None else dashboard)


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
