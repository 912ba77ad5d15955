"""Connecting to Ray: a local cluster, or an existing one via ``RAY_ADDRESS`` / ``--address``."""

from __future__ import annotations

import logging
import os
import warnings

import ray

logger = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    """Initialise Ray once: join ``address`` (or ``$RAY_ADDRESS``), else start locally."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        with warnings.catch_warnings():  # a note about a future default we already rely on
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
                                    category=FutureWarning)
            ray.init(log_to_driver=True)  # the dashboard serves the State API Ray Train uses


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
