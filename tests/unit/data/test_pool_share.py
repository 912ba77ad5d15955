"""Pool coverage: ``data.pool_share`` moves a seeded share of every client domain's train
split into the server's unlabelled pool, ``data.pool_sources`` adds whole non-client
domains; defaults keep every path and key as before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from engine.config import DataConfig, ModelConfig, PretrainConfig
from engine.data import DataError, PoolSettings, ShardBuilder, domain_catalog, read_shard
from engine.data.pool import composition, pool_source, pool_subset, share_split
from engine.data.shards import Shard
from engine.data.sources.mednist import mednist_counts
from engine.fl.client import shard_builder
from engine.train.mim import base_fingerprint

SHARE = 0.1
SHARING = ("breast", "ct-region")  # a MedMNIST and a MedNIST client domain
SOURCES = ("retina",)  # a non-client domain whose whole train split joins the pool


def _hashes(shard: Shard) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in shard.images}


@pytest.fixture(scope="module")
def plain(data_root: Path, shard_cache: Path) -> ShardBuilder:
    return ShardBuilder(domain_catalog(), data_root, shard_cache, download=False)


@pytest.fixture(scope="module")
def shared(data_root: Path, shard_cache: Path) -> ShardBuilder:
    pool = PoolSettings(share=SHARE, seed=0, domains=SHARING, sources=SOURCES)
    return ShardBuilder(domain_catalog(), data_root, shard_cache, download=False, pool=pool)


@pytest.fixture(scope="module")
def pool(shared: ShardBuilder) -> Shard:
    return read_shard(shared.pool())  # built once for the module (loads MedNIST)


def test_share_moves_from_the_train_split_into_the_pool(plain: ShardBuilder,
                                                        shared: ShardBuilder,
                                                        pool: Shard) -> None:
    full = read_shard(plain.domain("breast")["train"])
    kept = read_shard(shared.domain("breast")["train"])
    in_pool = np.array([pool_source(i) == "breast" for i in pool.ids])
    moved = int(in_pool.sum())
    assert abs(moved - SHARE * len(full)) <= 2  # ~10 %, rounded per class
    assert len(kept) == len(full) - moved
    assert not _hashes(kept) & {hashlib.sha256(x.tobytes()).hexdigest()
                                for x in pool.images[in_pool]}
    assert sorted([*kept.ids, *(i.split("::", 1)[1] for i in pool.ids[in_pool])]) == \
        sorted(full.ids)
    assert shared.domain_dir("breast") != plain.domain_dir("breast")
    assert shared.domain_dir("pneumonia") == plain.domain_dir("pneumonia")  # not sharing
    x, _ = kept.tensors()
    assert abs(float(x.mean())) < 0.05  # normalised with the kept part's own statistics


def test_share_is_stratified_by_label(plain: ShardBuilder, shared: ShardBuilder) -> None:
    full = read_shard(plain.domain("breast")["train"])
    kept = read_shard(shared.domain("breast")["train"])
    for cls in np.unique(full.labels):
        n_full, n_kept = (int((s.labels[:, 0] == cls).sum()) for s in (full, kept))
        assert n_full - n_kept == round(SHARE * n_full)


def test_val_and_test_never_change(plain: ShardBuilder, shared: ShardBuilder) -> None:
    for name in SHARING:
        for split in ("val", "test"):
            before = read_shard(plain.domain(name)[split])
            after = read_shard(shared.domain(name)[split])
            np.testing.assert_array_equal(after.ids, before.ids)
            np.testing.assert_array_equal(after.images, before.images)
            np.testing.assert_array_equal(after.labels, before.labels)


def test_pool_composition_says_what_the_pool_held(plain: ShardBuilder, shared: ShardBuilder,
                                                  pool: Shard) -> None:
    held = shared.pool_composition()
    assert list(held) == ["mednist", "breast", "ct-region", "retina"]
    assert sum(held.values()) == len(pool) == len(set(pool.ids))  # no image twice
    assert held["mednist"] == mednist_counts(plain.context)["_pool"]["pool"]  # untouched
    assert held["retina"] == len(read_shard(plain.domain("retina")["train"]))
    ct_full = read_shard(plain.domain("ct-region")["train"])
    ct_kept = read_shard(shared.domain("ct-region")["train"])
    assert held["ct-region"] == len(ct_full) - len(ct_kept)
    assert pool.labels is None


def test_a_cap_keeps_every_source_in_proportion(shared: ShardBuilder) -> None:
    held = shared.pool_composition()
    capped = shared.pool_composition(cap=1000, seed=0)
    assert sum(capped.values()) == 1000 and all(v > 0 for v in capped.values())
    total = sum(held.values())
    for name, n in capped.items():
        assert abs(n - 1 - 996 * (held[name] - 1) / (total - 4)) < 1
    assert shared.pool_composition(cap=1000, seed=0) == capped


def test_one_source_pool_is_capped_as_before() -> None:
    ids = np.asarray([f"CXR/{i:06d}.jpeg" for i in range(500)], dtype=object)
    legacy = np.sort(np.random.default_rng(3).choice(500, 120, replace=False))
    np.testing.assert_array_equal(pool_subset(ids, 120, 3), legacy)
    np.testing.assert_array_equal(pool_subset(ids, None, 3), np.arange(500))
    np.testing.assert_array_equal(pool_subset(ids, 900, 3), np.arange(500))


def test_the_share_is_deterministic_under_its_seed(data_root: Path, tmp_path: Path,
                                                   shared: ShardBuilder) -> None:
    def kept(seed: int, cache: Path) -> tuple[str, list[str]]:
        b = ShardBuilder(domain_catalog(), data_root, cache, download=False,
                         pool=PoolSettings(share=SHARE, seed=seed, domains=("breast",)))
        return b.domain_dir("breast").name, list(read_shard(b.domain("breast")["train"]).ids)

    again = kept(0, tmp_path / "a")
    assert again == (shared.domain_dir("breast").name,
                     list(read_shard(shared.domain("breast")["train"]).ids))
    other = kept(1, tmp_path / "b")
    assert other[0] != again[0] and other[1] != again[1]
    labels = np.arange(40) % 3
    np.testing.assert_array_equal(share_split(labels, 0.25, 5, "x")[0],
                                  share_split(labels, 0.25, 5, "x")[0])


def test_partitions_split_the_rest(shared: ShardBuilder) -> None:
    kept = read_shard(shared.domain("breast")["train"])
    parts = shared.partitions("breast", 3)
    ids = [i for client in parts for i in read_shard(client["train"]).ids]
    assert sorted(ids) == sorted(kept.ids)
    assert parts[0]["train"].is_relative_to(shared.domain_dir("breast"))


def test_every_key_changes_with_the_settings(data_root: Path, tmp_path: Path) -> None:
    def build(**data: object) -> ShardBuilder:
        return shard_builder(DataConfig(data_root=str(data_root), cache_dir=str(tmp_path),
                                        download=False, **data))

    base, share, seed, sources = (build(), build(pool_share=0.2),
                                  build(pool_share=0.2, mednist_seed=1),
                                  build(domains=("breast",), pool_sources=("retina",)))
    pools = {b.pool_path() for b in (base, share, seed, sources)}
    assert len(pools) == 4
    assert len({b.domain_dir("breast") for b in (base, share, seed)}) == 3
    assert sources.domain_dir("breast") == base.domain_dir("breast")  # no share given
    prints = {base_fingerprint(ModelConfig(), PretrainConfig(), p, None, 0) for p in pools}
    assert len(prints) == 4


def test_defaults_keep_every_key_of_old(tmp_path: Path) -> None:
    # Values of the code before pool coverage existed, for a data root without any file
    # (so the keys depend on the code alone): the pool, a domain and a partition folder.
    data = DataConfig(data_root=str(tmp_path / "none"), cache_dir="/c", download=False)
    b = shard_builder(data)
    assert str(b.pool_path()) == "/c/shards/server-pool-e378f3e205a9/pool.parquet"
    assert str(b.domain_dir("breast")) == "/c/shards/breast-7a1e79e8b248"
    assert str(b.domain_dir("ct-region")) == "/c/shards/ct-region-c803941efa70"
    assert base_fingerprint(ModelConfig(), PretrainConfig(), b.pool_path(), 512, 0) == \
        base_fingerprint(ModelConfig(), PretrainConfig(),
                         Path("/c/shards/server-pool-e378f3e205a9/pool.parquet"), 512, 0)
    explicit = shard_builder(DataConfig(data_root=str(tmp_path / "none"), cache_dir="/c",
                                        download=False, pool_share=0.0, pool_sources=()))
    assert explicit.pool_path() == b.pool_path()
    assert PoolSettings(domains=("breast",)).is_default


@pytest.mark.parametrize(("data", "message"), [
    ({"pool_share": 1.0}, "data.pool_share must be in [0, 1), got 1.0"),
    ({"pool_share": -0.1}, "data.pool_share must be in [0, 1), got -0.1"),
    ({"pool_sources": ("breast",)}, "data.pool_sources: ['breast'] are client domains"),
    ({"pool_sources": ("nope",)}, "data.pool_sources: unknown domain(s) ['nope']"),
    ({"domains": ("breast",), "pool_sources": ("retina", "retina")},
     "data.pool_sources has duplicates"),
])
def test_bad_values_are_refused(data: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DataConfig(**data)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_plain_settings_are_refused(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^pool share must be in \[0, 1\)"):
        PoolSettings(share=1.5)
    with pytest.raises(ValueError, match="are client domains"):
        PoolSettings(domains=("breast",), sources=("breast",))
    with pytest.raises(DataError, match="unknown domain 'nope'"):
        ShardBuilder(domain_catalog(), data_root, tmp_path,
                     pool=PoolSettings(sources=("nope",)))


def test_composition_names_every_source() -> None:
    ids = ["CXR/1.jpeg", "breast::train/3", "Hand/2.jpeg"]
    assert composition(ids, ["mednist", "breast", "retina"]) == \
        {"mednist": 2, "breast": 1, "retina": 0}
