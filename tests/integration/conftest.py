"""A small local Ray cluster shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """Ray on this machine with 2 CPUs (as in CI), started once per session."""
    if not ray.is_initialized():
        from engine.cluster.connect import use_local_env

        use_local_env()
        ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()
