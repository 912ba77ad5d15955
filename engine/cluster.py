"""Connecting to Ray: a local cluster, or an existing one via ``RAY_ADDRESS`` / ``--address``."""

from __future__ import annotations

import logging
import os
import warnings

import ray

logger = logging.getLogger(__name__)


LOCAL_ENV = {
    # Ray Train's controller polls its workers every 2 s by default; a local simulation runs
    # many short Train jobs (one per distillation), so poll faster.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def use_local_env() -> None:
    """Set :data:`LOCAL_ENV` (unless already set) before a local Ray starts; its processes
    inherit the environment."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def connect(address: str | None = None) -> None:
    """Initialise Ray once: join ``address`` (or ``$RAY_ADDRESS``), else start locally."""
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
            ray.init(log_to_driver=True)  # the dashboard serves the State API Ray Train uses


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
