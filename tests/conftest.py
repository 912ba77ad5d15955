"""Shared fixtures: the real data root, and a per-session shard cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("UMIM_DATA_ROOT")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets (``$UMIM_DATA_ROOT``, else ``../shared/data``).

    When ``UMIM_DATA_ROOT`` is set (as in CI) a missing folder is an error, not a skip.
    """
    root = _data_root().resolve()
    if not (root / "medmnist").is_dir():
        if os.environ.get("UMIM_DATA_ROOT"):
            pytest.fail(f"UMIM_DATA_ROOT={root} holds no medmnist/ folder")
        pytest.skip(f"real data not found at {root}; set UMIM_DATA_ROOT")
    return root


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard cache for the whole session, so real shards are built once."""
    return tmp_path_factory.mktemp("umim-cache")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models (many times faster than contended
    threads on a small machine); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
