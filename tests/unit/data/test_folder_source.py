from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from private_datasets import CLASSES, PER_CLASS

from engine.data import DataError, ShardBuilder, domain_catalog, read_shard, summarise_domains
from engine.data.images import centre_crop
from engine.data.unify import unify_images


def _build(entry: dict, data_root: Path, cache: Path, name: str = "mine") -> dict:
    catalog = domain_catalog({name: {"source": "folder", **entry}})
    paths = ShardBuilder(catalog, data_root, cache, download=False).domain(name)
    return {s: read_shard(p) for s, p in paths.items()}


def test_folder_domain_builds_unified_stratified_shards(image_folder: Path, tmp_path: Path
                                                        ) -> None:
    # relative to the data root; the label names are the sorted class folders
    shards = _build({"path": "lesions", "modality": "dermoscopy"}, image_folder.parent,
                    tmp_path)
    assert {s: len(x) for s, x in shards.items()} == {"train": 12, "val": 3, "test": 3}
    for split, shard in shards.items():
        assert shard.images.shape == (len(shard), 3, 28, 28) and shard.images.dtype == np.uint8
        assert shard.meta.label_names == CLASSES and shard.meta.task == "multi-class"
        assert shard.meta.owner == "mine" and shard.meta.split == split
        # stratified: every class is split 4 / 1 / 1, and labels match the class folder
        want = {"train": 4, "val": 1, "test": 1}[split]
        assert np.bincount(shard.labels[:, 0], minlength=3).tolist() == [want] * 3
        for sample_id, label in zip(shard.ids, shard.labels[:, 0], strict=True):
            assert sample_id.split("/")[0] == CLASSES[label]
    ids = [i for s in shards.values() for i in s.ids]
    assert len(set(ids)) == len(ids) == PER_CLASS * len(CLASSES)
    assert not any(i.startswith(".hidden") or i.endswith(".txt") for i in ids)
    assert shards["train"].meta.mean == pytest.approx(
        tuple(float(v) for v in (shards["train"].images / 255.0).mean(axis=(0, 2, 3))))


def test_folder_images_are_cropped_and_unified_like_every_source(image_folder: Path,
                                                                 tmp_path: Path) -> None:
    shards = _build({"path": str(image_folder)}, tmp_path / "unused-root", tmp_path)
    by_id = {i: img for s in shards.values() for i, img in zip(s.ids, s.images, strict=True)}
    rgb = np.asarray(Image.open(image_folder / "benign" / "rgb0.png"))
    np.testing.assert_array_equal(by_id["benign/rgb0.png"],
                                  unify_images(rgb[None], spatial_dims=2, in_channels=3)[0])
    grey = np.asarray(Image.open(image_folder / "normal" / "grey3.JPG"))
    assert grey.shape == (50, 30)  # portrait: cropped to its central 30 x 30
    expected = unify_images(centre_crop(grey)[None], spatial_dims=2, in_channels=1)[0]
    np.testing.assert_array_equal(by_id["normal/grey3.JPG"], expected)
    rgba = np.asarray(Image.open(image_folder / "malignant" / "rgba5.png"))[..., :3]
    np.testing.assert_array_equal(by_id["malignant/rgba5.png"],
                                  unify_images(rgba[None], spatial_dims=2, in_channels=3)[0])


def test_folder_split_is_seeded(image_folder: Path, tmp_path: Path) -> None:
    def ids(seed: int, cache: str) -> dict[str, list[str]]:
        shards = _build({"path": str(image_folder), "seed": seed}, tmp_path, tmp_path / cache)
        return {s: list(x.ids) for s, x in shards.items()}

    first = ids(0, "a")
    assert ids(0, "b") == first  # rebuilt from scratch in another cache: the same split
    assert ids(7, "c") != first
    catalog = domain_catalog({"x": {"source": "folder", "path": str(image_folder),
                                    "split": [0.5, 0.34, 0.16]}})
    counts = summarise_domains(catalog, tmp_path).domains[-1].counts
    assert counts == {"train": 9, "val": 6, "test": 3}  # per class: 3 / 2 / 1 of 6


def test_presplit_folder_is_used_as_given(presplit_folder: Path, tmp_path: Path) -> None:
    shards = _build({"path": str(presplit_folder), "label_names": ["pos", "neg"]}, tmp_path,
                    tmp_path)
    assert {s: len(x) for s, x in shards.items()} == {"train": 8, "val": 3, "test": 4}
    train = shards["train"]
    assert train.meta.task == "binary" and train.meta.label_names == ("pos", "neg")
    assert all(i.startswith("train/") for i in train.ids)
    for sample_id, label in zip(train.ids, train.labels[:, 0], strict=True):
        assert sample_id.split("/")[1] == ("pos", "neg")[label]  # label_names set the order
    assert np.bincount(train.labels[:, 0]).tolist() == [3, 5]
    # grey-only domain: every channel equal
    assert (train.images[:, 0] == train.images[:, 2]).all()


def test_folder_task_override_and_catalog_spec(presplit_folder: Path) -> None:
    catalog = domain_catalog({"x": {"source": "folder", "path": "xray", "task": "ordinal"}})
    spec = catalog["x"]
    assert spec.task == "ordinal" and spec.label_names == ()  # classes are read when built
    assert spec.source_name == "folder:xray"
    assert spec.to_dict()["path"] == "xray"
    resolved = summarise_domains(catalog, presplit_folder.parent).domains[-1]
    assert resolved.problem is None and resolved.spec.label_names == ("neg", "pos")
    assert resolved.spec.task == "ordinal" and resolved.counts == {"train": 8, "val": 3,
                                                                   "test": 4}


def test_folder_errors_at_build_time(image_folder: Path, presplit_folder: Path,
                                     tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    catalog = domain_catalog({"gone": {"source": "folder", "path": str(missing)}})  # no error
    with pytest.raises(DataError, match=f"image folder {missing} does not exist"):
        ShardBuilder(catalog, tmp_path, tmp_path).domain("gone")
    row = summarise_domains(catalog, tmp_path).domains[-1]
    assert row.counts == {} and str(missing) in (row.problem or "")
    with pytest.raises(DataError, match=r"class folders \['benign', 'malignant', 'normal'\] "
                                        "do not match the label_names"):
        _build({"path": str(image_folder), "label_names": ["benign", "other"]}, tmp_path,
               tmp_path)
    with pytest.raises(DataError, match="task 'binary' but 3 class folders"):
        _build({"path": str(image_folder), "task": "binary"}, tmp_path, tmp_path)
    partial = tmp_path / "partial"
    (partial / "train" / "a").mkdir(parents=True)
    (partial / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="give all three split folders or none"):
        _build({"path": str(partial)}, tmp_path, tmp_path)
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"x\.png is not a readable image"):
        _build({"path": str(broken)}, tmp_path, tmp_path)


@pytest.mark.parametrize(("entry", "message"), [
    ({}, r"needs key\(s\) \['path'\]"),
    ({"path": "p", "task": "multi-label"}, "key 'task' must be one of"),
    ({"path": "p", "split": [0.8, 0.3, 0.1]}, "key 'split' must be three positive"),
    ({"path": "p", "seed": "zero"}, "key 'seed' must be an integer"),
    ({"path": "p", "label_names": ["only"]}, "key 'label_names' needs at least 2"),
    ({"path": "p", "label_names": ["a", "b", "c"], "task": "binary"}, "exactly 2"),
    ({"path": "p", "dataset": "breastmnist"}, r"unknown key\(s\) \['dataset'\]"),
])
def test_bad_folder_entries(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"domain 'mine': .*{message}"):
        domain_catalog({"mine": {"source": "folder", **entry}})
