from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data import dirichlet_partition, iid_partition, partition


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), clients=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_iid_covers_every_sample_once(n: int, clients: int, seed: int) -> None:
    if n < clients:
        with pytest.raises(ValueError):
            iid_partition(n, clients, seed)
        return
    parts = iid_partition(n, clients, seed)
    _assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 8), min_size=50, max_size=2000),
       clients=st.integers(1, 40), alpha=st.floats(0.05, 100.0), seed=st.integers(0, 2**16))
def test_dirichlet_covers_every_sample_once(labels: list[int], clients: int, alpha: float,
                                            seed: int) -> None:
    y = np.asarray(labels)
    if len(y) < clients:
        return
    parts = dirichlet_partition(y, clients, alpha, seed)
    _assert_exact_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 1


def test_partitions_are_seeded() -> None:
    y = np.random.default_rng(0).integers(0, 5, 1000)
    for scheme in ("iid", "dirichlet"):
        a = partition(y, scheme, 10, seed=3)
        b = partition(y, scheme, 10, seed=3)
        c = partition(y, scheme, 10, seed=4)
        assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
        assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    y = np.repeat(np.arange(10), 500)

    def mean_classes(alpha: float) -> float:
        parts = dirichlet_partition(y, 20, alpha, seed=0)
        return float(np.mean([len(np.unique(y[p])) for p in parts]))

    assert mean_classes(0.05) < 4 < 9 < mean_classes(100.0)


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(np.zeros(10), "shards", 2, 0)  # type: ignore[arg-type]
