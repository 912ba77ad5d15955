from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from private_datasets import write_npz

from engine.data import DataError, ShardBuilder, domain_catalog, read_shard, summarise_domains
from engine.data.unify import unify_images

GRADES = ["none", "mild", "severe"]


def _build(path: Path, cache: Path, data_root: Path | None = None, **entry: object) -> dict:
    catalog = domain_catalog({"mine": {"source": "npz", "path": str(path), **entry}})
    paths = ShardBuilder(catalog, data_root or cache, cache, download=False).domain("mine")
    return {s: read_shard(p) for s, p in paths.items()}


@pytest.mark.parametrize(("shape", "dims", "channels"), [
    ((28, 28), 2, 1), ((64, 64, 3), 2, 3), ((28, 28, 28), 3, 1), ((28, 28, 1), 2, 1)])
def test_npz_domain_matches_its_file(tmp_path: Path, shape: tuple[int, ...], dims: int,
                                     channels: int) -> None:
    path = write_npz(tmp_path / "data" / "grades.npz", shape, num_classes=3)
    shards = _build(Path("grades.npz"), tmp_path / "cache", data_root=tmp_path / "data",
                    label_names=GRADES, task="ordinal")
    with np.load(path) as npz:
        for split, n in (("train", 40), ("val", 8), ("test", 12)):
            shard = shards[split]
            assert shard.images.shape == (n, 3, 28, 28)
            assert shard.meta.task == "ordinal" and shard.meta.label_names == tuple(GRADES)
            np.testing.assert_array_equal(shard.labels, npz[f"{split}_labels"].astype(np.int64))
            raw = npz[f"{split}_images"]
            raw = raw[..., 0] if shape[-1:] == (1,) and dims == 2 else raw
            np.testing.assert_array_equal(
                shard.images, unify_images(raw, spatial_dims=dims, in_channels=channels))
            assert shard.ids[0] == f"{split}/0"


def test_npz_multi_label_and_one_dimensional_labels(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "ml.npz", (28, 28), num_classes=4, multi_label=True)
    shards = _build(path, tmp_path, label_names=["a", "b", "c", "d"], task="multi-label")
    assert shards["train"].labels.shape == (40, 4) and shards["train"].meta.num_classes == 4
    rng = np.random.default_rng(3)
    flat = {f"{s}_labels": rng.integers(0, 2, n) for s, n in (("train", 40), ("val", 8),
                                                              ("test", 12))}
    binary = write_npz(tmp_path / "flat.npz", (28, 28), num_classes=2, **flat)
    shards = _build(binary, tmp_path, label_names=["neg", "pos"], task="binary")
    np.testing.assert_array_equal(shards["val"].labels[:, 0], flat["val_labels"])


def test_npz_spatial_dims_decides_ambiguous_shapes(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "tiny.npz", (3, 3, 3), num_classes=2)
    as_rgb = _build(path, tmp_path / "a", label_names=["a", "b"], task="binary")
    as_3d = _build(path, tmp_path / "b", label_names=["a", "b"], task="binary", spatial_dims=3)
    with np.load(path) as npz:
        raw = npz["test_images"]
    np.testing.assert_array_equal(as_3d["test"].images,
                                  unify_images(raw, spatial_dims=3, in_channels=1))
    np.testing.assert_array_equal(as_rgb["test"].images,
                                  unify_images(raw, spatial_dims=2, in_channels=3))
    assert not np.array_equal(as_rgb["test"].images, as_3d["test"].images)


def test_npz_file_errors_name_the_file(tmp_path: Path) -> None:
    labels = {"label_names": GRADES, "task": "multi-class"}
    missing = tmp_path / "absent.npz"
    catalog = domain_catalog({"mine": {"source": "npz", "path": str(missing), **labels}})
    with pytest.raises(DataError, match=f"npz file {missing} does not exist"):
        ShardBuilder(catalog, tmp_path, tmp_path).domain("mine")
    rng = np.random.default_rng(0)
    cases = {
        "lacks key": {"test_labels": None},
        "dtype float32": {"val_images": rng.random((8, 28, 28)).astype(np.float32)},
        r"labels range over \[5, 5\], expected \[0, 2\]": {
            "train_labels": np.full((40, 1), 5, np.uint8)},
        r"shape \(32, 32\) per sample": {"test_images": np.zeros((12, 32, 32), np.uint8)},
        "12 images but 11 labels": {"test_labels": np.zeros((11, 1), np.uint8)},
        r"labels have dtype float64": {"val_labels": np.zeros((8, 1))},
        r"images have shape \(40, 28, 30\)": {"train_images": np.zeros((40, 28, 30), np.uint8)},
    }
    for i, (message, change) in enumerate(cases.items()):
        path = write_npz(tmp_path / f"case{i}.npz", (28, 28), num_classes=3, **change)
        with pytest.raises(DataError, match=f"case{i}.npz.*{message}"):
            _build(path, tmp_path / f"c{i}", **labels)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"no zip here" * 10)
    with pytest.raises(DataError, match=r"garbage\.npz is not a readable \.npz"):
        _build(garbage, tmp_path / "g", **labels)


def test_npz_counts_and_missing_file_in_summary(tmp_path: Path) -> None:
    write_npz(tmp_path / "grades.npz", (28, 28), num_classes=3, counts=(10, 3, 5))
    catalog = domain_catalog({
        "mine": {"source": "npz", "path": "grades.npz", "label_names": GRADES,
                 "task": "ordinal"},
        "gone": {"source": "npz", "path": "gone.npz", "label_names": ["a", "b"],
                 "task": "binary"}})
    rows = {r.spec.name: r for r in summarise_domains(catalog, tmp_path).domains}
    assert rows["mine"].counts == {"train": 10, "val": 3, "test": 5}
    assert rows["mine"].to_dict()["source"] == "npz:grades.npz"
    assert rows["mine"].to_dict()["task"] == "ordinal" and rows["mine"].problem is None
    assert rows["gone"].counts == {} and str(tmp_path / "gone.npz") in rows["gone"].problem


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "x.npz", "task": "binary"}, r"needs key\(s\) \['label_names'\]"),
    ({"path": "x.npz", "label_names": ["a", "b"]}, r"needs key\(s\) \['task'\]"),
    ({"label_names": ["a", "b"], "task": "binary"}, r"needs key\(s\) \['path'\]"),
    ({"path": "x.npz", "label_names": ["a", "b"], "task": "regression"},
     "key 'task' must be one of"),
    ({"path": "x.npz", "label_names": ["a", "b", "c"], "task": "binary"}, "exactly 2"),
    ({"path": "x.npz", "label_names": "ab", "task": "binary"}, "must be a list of names"),
    ({"path": "x.npz", "label_names": ["a", "a"], "task": "multi-class"}, "distinct names"),
    ({"path": "x.npz", "label_names": ["a", "b"], "task": "binary", "spatial_dims": 4},
     "key 'spatial_dims' must be 2 or 3"),
    ({"path": "", "label_names": ["a", "b"], "task": "binary"}, "key 'path' must be"),
    ({"path": "x.npz", "label_names": ["a", "b"], "task": "binary", "size": 64},
     r"unknown key\(s\) \['size'\]"),
])
def test_bad_npz_entries(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"domain 'mine': .*{message}"):
        domain_catalog({"mine": {"source": "npz", **entry}})
