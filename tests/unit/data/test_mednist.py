from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import DataError, load_mednist, split_mednist
from engine.data.mednist import MEDNIST_CLASSES, list_mednist

REAL_COUNTS = {"AbdomenCT": 10000, "BreastMRI": 8954, "CXR": 10000, "ChestCT": 10000,
               "Hand": 10000, "HeadCT": 10000}
CLAIMS = {"ct-region": [0, 3, 5], "mr-xr": [1, 2, 4]}


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), value, dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _fake_tree(root: Path, per_class: int = 4) -> Path:
    for c, cls in enumerate(MEDNIST_CLASSES):
        folder = root / "mednist" / "MedNIST" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i:06d}.jpeg").write_bytes(_jpeg(40 * c + i))
    return root


def test_real_tarball_listing_has_all_images(data_root: Path) -> None:
    names, labels = list_mednist(data_root)
    assert len(names) == 58954 == len(set(names))
    counts = dict(zip(MEDNIST_CLASSES, np.bincount(labels), strict=True))
    assert counts == REAL_COUNTS


def test_folder_and_tarball_give_the_same_arrays(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path / "folder")
    from_folder = load_mednist(root, download=False)
    tar_root = tmp_path / "tar"
    (tar_root / "mednist").mkdir(parents=True)
    with tarfile.open(tar_root / "mednist" / "MedNIST.tar.gz", "w:gz") as tar:
        tar.add(root / "mednist" / "MedNIST", arcname="MedNIST")
    from_tar = load_mednist(tar_root, download=False)
    assert from_folder.names == from_tar.names
    np.testing.assert_array_equal(from_folder.images, from_tar.images)
    np.testing.assert_array_equal(from_folder.labels, from_tar.labels)
    assert from_folder.images.shape == (24, 64, 64)
    assert list_mednist(tar_root)[0] == from_tar.names


def test_corrupt_jpeg_and_truncated_tarball_are_clear_errors(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path / "a")
    (root / "mednist" / "MedNIST" / "CXR" / "000001.jpeg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"CXR/000001\.jpeg is not a readable JPEG"):
        load_mednist(root, download=False)
    tar_root = tmp_path / "b"
    (tar_root / "mednist").mkdir(parents=True)
    good = _fake_tree(tmp_path / "c")
    tarball = tar_root / "mednist" / "MedNIST.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(good / "mednist" / "MedNIST", arcname="MedNIST")
    tarball.write_bytes(tarball.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_mednist(tar_root, download=False)


def test_missing_mednist_offline_says_where(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"MedNIST\.tar\.gz"):
        load_mednist(tmp_path, download=False)


def test_split_is_disjoint_complete_and_stable(data_root: Path) -> None:
    _, labels = list_mednist(data_root)
    first = split_mednist(labels, CLAIMS, seed=0)
    again = split_mednist(labels, CLAIMS, seed=0)
    parts = [first.pool] + [idx for d in first.domains.values() for idx in d.values()]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)  # disjoint, and covers all
    np.testing.assert_array_equal(first.pool, again.pool)
    for name in CLAIMS:
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(first.domains[name][split], again.domains[name][split])
        held = np.unique(labels[np.concatenate(list(first.domains[name].values()))])
        assert sorted(held.tolist()) == sorted(CLAIMS[name])
    # half of every class goes to the pool
    pool_counts = np.bincount(labels[first.pool], minlength=6)
    np.testing.assert_allclose(pool_counts, np.bincount(labels) / 2, atol=1)
    other = split_mednist(labels, CLAIMS, seed=1)
    assert not np.array_equal(first.pool, other.pool)


def test_split_rejects_double_claims_and_bad_fractions() -> None:
    labels = np.repeat(np.arange(6), 10)
    with pytest.raises(ValueError, match="claimed by two domains"):
        split_mednist(labels, {"a": [0, 1], "b": [1, 2]})
    with pytest.raises(ValueError, match="sum to 1"):
        split_mednist(labels, CLAIMS, split_fractions=(0.5, 0.2, 0.2))
