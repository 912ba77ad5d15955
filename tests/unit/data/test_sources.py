from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.data import (
    SOURCES,
    DataError,
    DomainSpec,
    MedNISTSplitSettings,
    RawSplit,
    ShardBuilder,
    Source,
    SourceContext,
    domain_catalog,
    get_source,
    known_sources,
    read_shard,
    register_source,
    summarise_domains,
)
from engine.data.sources import registry
from engine.data.sources.base import check_keys, common_fields
from engine.data.sources.npz import NpzSource


class ConstantSource(Source):
    """A plugin source: ``n`` constant grey 28 x 28 images per split, label ``i % 2``."""

    def parse(self, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        check_keys(name, entry, {"n"})
        return DomainSpec(task="binary", label_names=("even", "odd"),
                          options={"n": int(entry.get("n", 4))}, **common_fields(name, entry))

    def fingerprint(self, spec: DomainSpec, ctx: SourceContext) -> object:
        return "constant-v1"

    def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
        n = spec.options["n"]
        labels = (np.arange(n) % 2)[:, None].astype(np.int64)
        ids = np.asarray([str(i) for i in range(n)], dtype=object)
        return {s: RawSplit(np.full((n, 28, 28), 7, np.uint8), labels, ids, 2, 1)
                for s in ("train", "val", "test")}


@pytest.fixture
def constant_source() -> Iterator[str]:
    register_source("constant", ConstantSource)
    yield "constant"
    SOURCES.unregister("constant")


def test_builtin_sources_are_registered() -> None:
    assert {"medmnist", "mednist", "folder", "npz"} <= set(known_sources())
    assert isinstance(get_source("npz"), NpzSource) and get_source("npz") is get_source("npz")


def test_unknown_source_lists_the_known_ones(constant_source: str) -> None:
    with pytest.raises(ValueError, match=r"domain 'x': source must be one of \['constant', "
                                         r"'folder', 'medmnist', 'mednist', 'npz'.*got 'kaggle'"):
        domain_catalog({"x": {"source": "kaggle"}})
    with pytest.raises(ValueError, match="domain 'x': key 'source' is missing"):
        domain_catalog({"x": {"dataset": "breastmnist"}})


def test_a_registered_source_builds_shards(constant_source: str, tmp_path: Path) -> None:
    catalog = domain_catalog({"c": {"source": "constant", "n": 6}})
    assert catalog["c"].source_name == "constant" and catalog["c"].options == {"n": 6}
    builder = ShardBuilder(catalog, tmp_path, tmp_path)
    shard = read_shard(builder.domain("c")["val"])
    assert shard.images.shape == (6, 3, 28, 28) and (shard.images == 7).all()
    assert shard.labels[:, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert summarise_domains(catalog, tmp_path).domains[-1].counts == {
        "train": 6, "val": 6, "test": 6}  # Source.count's default: load and count
    with pytest.raises(ValueError, match="already registered"):
        register_source("constant", NpzSource)
    with pytest.raises(ValueError, match="is not a source"):
        register_source("nothing", dict)  # type: ignore[arg-type]


def test_import_path_and_entry_point_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"path": "x.npz", "label_names": ["a", "b"], "task": "binary"}
    spec = domain_catalog({"x": {"source": "engine.data.sources.npz:NpzSource", **entry}})["x"]
    assert spec.task == "binary" and spec.source == "engine.data.sources.npz:NpzSource"
    with pytest.raises(ValueError, match=r"domain 'x': cannot import 'engine\.nope' "
                                         r"\(from 'engine\.nope:Thing'\)"):
        domain_catalog({"x": {"source": "engine.nope:Thing"}})
    with pytest.raises(ValueError, match="is not a source"):
        domain_catalog({"x": {"source": "engine.data.spec:DomainSpec"}})

    point = EntryPoint(name="vendor-npz", value="engine.data.sources.npz:NpzSource",
                       group=registry.ENTRY_POINT_GROUP)
    def fake_entry_points(group: str, name: str | None = None) -> list[EntryPoint]:
        return [point] if group == registry.ENTRY_POINT_GROUP and name in (None, point.name) \
            else []

    import strategies.registry

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(strategies.registry, "entry_points", fake_entry_points)
    try:
        assert "vendor-npz" in known_sources() and "vendor-npz" not in SOURCES
        assert domain_catalog({"x": {"source": "vendor-npz", **entry}})["x"].task == "binary"
        assert SOURCES["vendor-npz"] is NpzSource  # loaded once, then registered
    finally:
        SOURCES.unregister("vendor-npz")


@pytest.mark.parametrize(("entry", "message"), [
    ({"source": "medmnist", "dataset": "breastmnist", "colour": "red"}, "unknown key"),
    ({"source": "medmnist", "dataset": "breastmnist", "classes": ["CXR"]}, "unknown key"),
    ({"source": "medmnist"}, "needs 'dataset'"),
    ({"source": "medmnist", "dataset": "nosuchmnist"}, "key 'dataset': unknown MedMNIST"),
    ({"source": "medmnist", "dataset": "vesselmnist3d", "size": 128}, "key 'size': .*no size"),
    ({"source": "medmnist", "dataset": "breastmnist", "size": "big"}, "key 'size' must be"),
    ({"source": "mednist", "classes": ["CXR", "CXR"]}, "needs 'classes'"),
    ({"source": "mednist", "classes": ["CXR"], "dataset": "x"}, "unknown key"),
])
def test_bad_builtin_entries_name_the_domain(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"domain 'extra': .*{message}"):
        domain_catalog({"extra": entry})


def test_catalog_reads_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the catalog touched the file system")

    monkeypatch.setattr(Path, "stat", refuse)
    monkeypatch.setattr(Path, "iterdir", refuse)
    catalog = domain_catalog({
        "f": {"source": "folder", "path": "/does/not/exist"},
        "n": {"source": "npz", "path": "missing.npz", "label_names": ["a", "b"],
              "task": "binary"}})
    assert len(catalog) == 10


def test_new_fields_are_left_out_of_builtin_fingerprints() -> None:
    catalog = domain_catalog({"f": {"source": "folder", "path": "imgs", "seed": 3}})
    assert set(catalog["breast"].to_dict()) == {
        "name", "source", "modality", "body_part", "task", "label_names", "dataset", "size",
        "classes"}
    assert catalog["f"].to_dict()["options"] == {"split": [0.7, 0.1, 0.2], "seed": 3,
                                                 "auto_task": True}


# Shard folders of the eight mission domains and the pool, as computed before sources were
# introduced, for a data root whose raw files have a fixed size and mtime: existing shard
# caches keep their folder names, so nothing is rebuilt.
LEGACY_FOLDERS = {
    "breast": "breast-1ae43e2621c5", "pneumonia": "pneumonia-943aecf3fb2b",
    "retina": "retina-ca77c2bd0d56", "pathology": "pathology-1cb7dc2a5531",
    "adrenal": "adrenal-93a31f66a55b", "vessel": "vessel-41c06f93900c",
    "ct-region": "ct-region-faa3ba8690a9", "mr-xr": "mr-xr-e7c32e9adf19",
    "pool": "server-pool-d96264eaf887",
}
LEGACY_WITHOUT_FILES = {"breast": "breast-7a1e79e8b248", "ct-region": "ct-region-c803941efa70",
                        "pool": "server-pool-e378f3e205a9"}
LEGACY_SEED_5 = {"ct-region": "ct-region-9f0b4dd94f9b", "pool": "server-pool-57818053364b"}


def _folders(root: Path, **kw: Any) -> dict[str, str]:
    builder = ShardBuilder(domain_catalog(), root, root / "cache", download=False, **kw)
    out = {name: builder.domain_dir(name).name for name in builder.catalog}
    return {**out, "pool": builder.pool_path().parent.name}


def test_shard_folders_of_the_mission_domains_are_unchanged(tmp_path: Path) -> None:
    assert _folders(tmp_path).items() >= LEGACY_WITHOUT_FILES.items()
    seeded = _folders(tmp_path, mednist=MedNISTSplitSettings(seed=5))
    assert seeded.items() >= LEGACY_SEED_5.items()
    for rel in ("medmnist/breastmnist.npz", "medmnist/vesselmnist3d.npz",
                "mednist/MedNIST.tar.gz"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"0" * 1000)
        os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)
    assert _folders(tmp_path) == LEGACY_FOLDERS


def test_mednist_problem_is_shared_by_its_domains(tmp_path: Path) -> None:
    summary = summarise_domains(domain_catalog(), tmp_path)
    rows = {r.spec.name: r for r in summary.domains}
    assert not summary.ok and summary.pool_size is None
    assert rows["ct-region"].problem == rows["mr-xr"].problem
    assert "MedNIST" in (rows["ct-region"].problem or "")
    assert "breastmnist.npz is missing" in (rows["breast"].problem or "")


def test_raw_splits_of_mixed_sizes_keep_their_order(constant_source: str,
                                                    tmp_path: Path) -> None:
    images = [np.full((s, s), v, np.uint8) for s, v in ((28, 10), (56, 20), (28, 30))]

    class Mixed(ConstantSource):
        def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
            ids = np.asarray(["a", "b", "c"], dtype=object)
            labels = np.array([[0], [1], [0]], dtype=np.int64)
            return {s: RawSplit(list(images), labels, ids, 2, 1)
                    for s in ("train", "val", "test")}

    register_source("constant", Mixed, replace=True)
    catalog = domain_catalog({"m": {"source": "constant"}})
    shard = read_shard(ShardBuilder(catalog, tmp_path, tmp_path).domain("m")["test"])
    assert shard.images[:, 0, 0, 0].tolist() == [10, 20, 30] and list(shard.ids) == ["a", "b",
                                                                                     "c"]
    with pytest.raises(DataError, match="unknown domain"):
        ShardBuilder(catalog, tmp_path, tmp_path).domain("nope")
