from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.data import (
    DataError,
    MedNISTSplitSettings,
    ShardBuilder,
    domain_catalog,
    load_medmnist,
    read_shard,
)
from engine.data.prepare import PARTITION_COMPLETE
from engine.data.unify import unify_images


@pytest.fixture(scope="module")
def builder(data_root: Path, shard_cache: Path) -> ShardBuilder:
    return ShardBuilder(domain_catalog(), data_root, shard_cache, download=False)


def test_medmnist_domain_shards_match_the_source(builder: ShardBuilder, data_root: Path) -> None:
    paths = builder.domain("adrenal")
    raw = load_medmnist("adrenalmnist3d", 28, data_root, download=False)
    for split in ("train", "val", "test"):
        shard = read_shard(paths[split])
        assert shard.meta.owner == "adrenal" and shard.meta.split == split
        np.testing.assert_array_equal(shard.labels, raw[split].labels)
        np.testing.assert_array_equal(
            shard.images, unify_images(raw[split].images, spatial_dims=3, in_channels=1))
    train = read_shard(paths["train"])
    x, _ = train.tensors()
    assert abs(float(x.mean())) < 0.05  # normalised with its own train statistics


def test_shards_are_built_once(builder: ShardBuilder) -> None:
    first = builder.domain("breast")
    stamp = first["train"].stat().st_mtime_ns
    again = ShardBuilder(builder.catalog, builder.data_root, builder.cache_dir,
                         download=False).domain("breast")
    assert again == first and again["train"].stat().st_mtime_ns == stamp


def test_size_64_domain_is_unified_to_28(data_root: Path, shard_cache: Path) -> None:
    catalog = domain_catalog({"adrenal64": {"source": "medmnist", "dataset": "adrenalmnist3d",
                                            "size": 64}})
    shard = read_shard(ShardBuilder(catalog, data_root, shard_cache).domain("adrenal64")["val"])
    assert shard.images.shape == (98, 3, 28, 28)


def test_mednist_domains_and_pool_are_disjoint(builder: ShardBuilder) -> None:
    ids: dict[str, set[str]] = {}
    for name in ("ct-region", "mr-xr"):
        paths = builder.domain(name)
        for split, path in paths.items():
            shard = read_shard(path)
            assert shard.meta.label_names == builder.catalog[name].label_names
            assert {n.split("/")[0] for n in shard.ids} == set(builder.catalog[name].classes)
            ids[f"{name}/{split}"] = set(shard.ids)
    pool = read_shard(builder.pool())
    assert pool.labels is None and pool.meta.num_classes == 0
    ids["pool"] = set(pool.ids)
    total = sum(len(v) for v in ids.values())
    assert len(set().union(*ids.values())) == total == 58954
    assert len(pool) == 29477


def test_another_mednist_seed_gives_other_shards(builder: ShardBuilder) -> None:
    other = ShardBuilder(builder.catalog, builder.data_root, builder.cache_dir,
                         mednist=MedNISTSplitSettings(seed=5), download=False)
    assert other.pool_path() != builder.pool_path()
    assert other.domain_dir("ct-region") != builder.domain_dir("ct-region")
    assert other.domain_dir("breast") == builder.domain_dir("breast")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_cover_the_domain(builder: ShardBuilder, scheme: str) -> None:
    base = {s: read_shard(p) for s, p in builder.domain("pneumonia").items()}
    clients = builder.partitions("pneumonia", 8, scheme=scheme, seed=1, alpha=0.3)
    assert len(clients) == 8
    for split in ("train", "val", "test"):
        parts = [read_shard(c[split]) for c in clients]
        assert sorted(i for p in parts for i in p.ids) == sorted(base[split].ids)
        assert {p.meta.owner for p in parts} == {f"pneumonia#{i}" for i in range(8)}


def test_partition_is_found_per_client_and_rebuilt_after_a_crash(builder: ShardBuilder) -> None:
    clients = builder.partitions("breast", 5, scheme="iid", seed=3)
    folder = clients[0]["train"].parents[1]
    assert (folder / PARTITION_COMPLETE).exists()
    fresh = ShardBuilder(builder.catalog, builder.data_root, builder.cache_dir, download=False)
    assert [fresh.partition("breast", 5, i, scheme="iid", seed=3) for i in range(5)] == clients
    with pytest.raises(DataError, match="out of range"):
        fresh.partition("breast", 5, 5, scheme="iid", seed=3)
    # a crash mid-write: no marker, a shard missing -> the next builder writes it again
    (folder / PARTITION_COMPLETE).unlink()
    clients[4]["test"].unlink()
    again = ShardBuilder(builder.catalog, builder.data_root, builder.cache_dir, download=False)
    assert again.partition("breast", 5, 4, scheme="iid", seed=3) == clients[4]
    assert clients[4]["test"].exists() and (folder / PARTITION_COMPLETE).exists()
