from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.data import DataError, available_flags, load_medmnist, medmnist_spec
from engine.data.medmnist import read_label_counts
from engine.data.medmnist_info import medmnist_info

# Counts from ../shared/data/README.md.
README_COUNTS = {
    ("breastmnist", 28): (546, 78, 156),
    ("pneumoniamnist", 28): (4708, 524, 624),
    ("retinamnist", 28): (1080, 120, 400),
    ("adrenalmnist3d", 28): (1188, 98, 298),
    ("vesselmnist3d", 28): (1335, 191, 382),
    ("pathmnist_subset", 28): (700, 100, 200),
    ("adrenalmnist3d", 64): (1188, 98, 298),
}


@pytest.mark.parametrize(("flag", "size"), list(README_COUNTS))
def test_real_files_load_with_readme_counts(data_root: Path, flag: str, size: int) -> None:
    splits = load_medmnist(flag, size, data_root, download=False)
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == README_COUNTS[(flag, size)]
    spec = medmnist_spec(flag, size)
    for arrays in splits.values():
        assert arrays.images.shape[1:] == spec.image_shape()
        assert arrays.labels.dtype == np.int64 and arrays.labels.shape[1] == 1
    assert read_label_counts(flag, size, data_root) == dict(
        zip(("train", "val", "test"), README_COUNTS[(flag, size)], strict=True))


def test_every_info_dataset_and_size_has_a_spec() -> None:
    info = medmnist_info()
    for flag in info:
        sizes = (28, 64) if flag.endswith("3d") else (28, 64, 128, 224)
        for size in sizes:
            spec = medmnist_spec(flag, size)
            assert spec.url and spec.md5 and len(spec.md5) == 32
            assert spec.filename == (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
            assert spec.num_classes == len(info[flag]["label"])
    assert medmnist_spec("chestmnist").task == "multi-label"
    assert medmnist_spec("chestmnist").num_labels == 14
    assert medmnist_spec("retinamnist").task == "ordinal"
    assert medmnist_spec("organmnist3d", 64).image_shape() == (64, 64, 64)
    assert medmnist_spec("dermamnist", 224).image_shape() == (224, 224, 3)
    assert "pathmnist_subset" in available_flags()
    assert medmnist_spec("pathmnist_subset").url is None


def test_unknown_dataset_and_size_are_clear_errors() -> None:
    with pytest.raises(DataError, match="unknown MedMNIST dataset 'nosuchmnist'"):
        medmnist_spec("nosuchmnist")
    with pytest.raises(DataError, match="no size 128"):
        medmnist_spec("vesselmnist3d", 128)


def _copy(data_root: Path, tmp_path: Path, name: str = "breastmnist.npz") -> Path:
    target = tmp_path / "medmnist" / name
    target.parent.mkdir(parents=True)
    shutil.copy(data_root / "medmnist" / name, target)
    target.chmod(0o644)
    return target


def test_truncated_file_is_a_clear_error(data_root: Path, tmp_path: Path) -> None:
    target = _copy(data_root, tmp_path)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"breastmnist\.npz.*(truncated or corrupt)"):
        load_medmnist("breastmnist", 28, tmp_path, download=False)


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "medmnist" / "breastmnist.npz"
    target.parent.mkdir()
    target.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_medmnist("breastmnist", 28, tmp_path, download=False)


def _rewrite(target: Path, **changes: np.ndarray | None) -> None:
    with np.load(target) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez_compressed(target, **arrays)


def test_missing_key_names_the_key(data_root: Path, tmp_path: Path) -> None:
    target = _copy(data_root, tmp_path)
    _rewrite(target, val_labels=None)
    with pytest.raises(DataError, match=r"lacks key\(s\) \['val_labels'\]"):
        load_medmnist("breastmnist", 28, tmp_path, download=False)


def test_wrong_shape_dtype_labels_and_counts(data_root: Path, tmp_path: Path) -> None:
    with np.load(data_root / "medmnist" / "breastmnist.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"]
    cases = {
        "dtype float32": dict(train_images=images.astype(np.float32)),
        r"shape \(28, 28, 3\) per sample": dict(train_images=np.repeat(images[..., None], 3, -1)),
        r"labels range over \[0, 7\]": dict(train_labels=(labels * 7).astype(np.uint8)),
        "545 samples, expected 546": dict(train_images=images[:-1], train_labels=labels[:-1]),
        "546 images but 545 labels": dict(train_labels=labels[:-1]),
    }
    for i, (message, change) in enumerate(cases.items()):
        sub = tmp_path / f"case{i}"
        _rewrite(_copy(data_root, sub), **change)
        with pytest.raises(DataError, match=message):
            load_medmnist("breastmnist", 28, sub, download=False)


def test_missing_file_offline_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_medmnist("breastmnist", 28, tmp_path, download=False)
    text = str(err.value)
    assert str(tmp_path / "medmnist" / "breastmnist.npz") in text
    assert "zenodo.org" in text and "750601b1f35ba3300ea97c75c52ff8f6" in text


def test_download_from_a_local_url_checks_md5(data_root: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = data_root / "medmnist" / "breastmnist.npz"
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    spec = medmnist_spec("breastmnist")
    assert spec.md5 == md5  # the shared copy is the official file
    good = type(spec)(**{**spec.__dict__, "url": source.as_uri()})
    monkeypatch.setattr("engine.data.medmnist.medmnist_spec", lambda flag, size=28: good)
    splits = load_medmnist("breastmnist", 28, tmp_path / "root")
    assert len(splits["train"]) == 546
    assert (tmp_path / "root" / "medmnist" / "breastmnist.npz").exists()

    bad = type(spec)(**{**spec.__dict__, "url": source.as_uri(), "md5": "0" * 32})
    monkeypatch.setattr("engine.data.medmnist.medmnist_spec", lambda flag, size=28: bad)
    with pytest.raises(DataError, match="failed its check"):
        load_medmnist("breastmnist", 28, tmp_path / "other")
    assert not (tmp_path / "other" / "medmnist" / "breastmnist.npz").exists()


def test_unreachable_url_is_an_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    spec = medmnist_spec("breastmnist")
    gone = type(spec)(**{**spec.__dict__, "url": (tmp_path / "nowhere.npz").as_uri()})
    monkeypatch.setattr("engine.data.medmnist.medmnist_spec", lambda flag, size=28: gone)
    with pytest.raises(DataError, match="are you offline"):
        load_medmnist("breastmnist", 28, tmp_path / "root")


def test_subset_without_source_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no public download"):
        load_medmnist("pathmnist_subset", 28, tmp_path)
