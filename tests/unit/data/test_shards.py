from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data import DataError, Shard, ShardMeta, read_shard, write_shard


def _shard(n: int, width: int | None, seed: int = 0) -> Shard:
    rng = np.random.default_rng(seed)
    meta = ShardMeta(owner="breast", split="train", task="binary",
                     label_names=("a", "b"), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    return Shard(ids=np.asarray([f"train/{i}" for i in range(n)], dtype=object),
                 images=rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8),
                 labels=None if width is None else rng.integers(0, 2, (n, width)),
                 meta=meta)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 300), width=st.sampled_from([None, 1, 14]), seed=st.integers(0, 99))
def test_shard_round_trips_unchanged(tmp_path: Path, n: int, width: int | None, seed: int) -> None:
    shard = _shard(n, width, seed)
    back = read_shard(write_shard(tmp_path / f"s-{n}-{width}-{seed}.parquet", shard))
    np.testing.assert_array_equal(back.images, shard.images)
    assert list(back.ids) == list(shard.ids)
    assert back.meta == shard.meta
    if width is None:
        assert back.labels is None
    else:
        np.testing.assert_array_equal(back.labels, shard.labels)
        assert back.labels.dtype == np.int64


def test_tensors_are_normalised_with_the_shard_stats() -> None:
    shard = _shard(10, 1)
    x, y = shard.tensors()
    expected = (shard.images[3, 1] / 255.0 - 0.2) / 0.5
    np.testing.assert_allclose(x[3, 1].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert y is not None and y.shape == (10, 1)


def test_subset_and_shape_checks() -> None:
    shard = _shard(10, 1)
    sub = shard.subset(np.array([1, 3]), owner="breast#0")
    assert list(sub.ids) == ["train/1", "train/3"] and sub.meta.owner == "breast#0"
    with pytest.raises(DataError, match="images must be uint8"):
        Shard(ids=shard.ids, images=shard.images[:5], labels=shard.labels, meta=shard.meta)


def test_corrupt_shard_is_a_clear_error(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "x.parquet", _shard(5, 1))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="cannot be read"):
        read_shard(path)
