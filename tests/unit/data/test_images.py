from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import DataError
from engine.data.images import centre_crop, read_image


def test_sixteen_bit_grey_is_scaled_per_image(tmp_path: Path) -> None:
    values = np.linspace(1000, 3000, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "ct.png")
    assert Image.open(tmp_path / "ct.png").mode.startswith("I")
    pixels = read_image(tmp_path / "ct.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (24, 24)
    assert (pixels.min(), pixels.max()) == (0, 255)
    expected = np.round((values.astype(float) - 1000) * 255 / 2000).astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    Image.fromarray(np.full((8, 8), 500, np.uint16)).save(tmp_path / "flat.png")
    assert (read_image(tmp_path / "flat.png") == 0).all()


def test_modes_become_grey_or_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])
    palette = Image.fromarray(rng.integers(0, 4, (10, 10), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (10, 10, 3)
    grey_alpha = rng.integers(0, 256, (12, 12, 2), dtype=np.uint8)
    Image.fromarray(grey_alpha, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), grey_alpha[..., 0])
    Image.fromarray(rng.integers(0, 2, (9, 9), dtype=np.uint8).astype(bool)).save(
        tmp_path / "bw.png")
    assert set(np.unique(read_image(tmp_path / "bw.png"))) <= {0, 255}


def test_non_square_images_are_centre_cropped(tmp_path: Path) -> None:
    wide = np.arange(10 * 16, dtype=np.uint8).reshape(10, 16)
    np.testing.assert_array_equal(centre_crop(wide), wide[:, 3:13])
    tall = np.zeros((15, 6, 3), np.uint8)
    tall[4:10] = 200
    assert centre_crop(tall).shape == (6, 6, 3) and (centre_crop(tall) == 200).all()
    Image.fromarray(wide).save(tmp_path / "w.png")
    np.testing.assert_array_equal(read_image(tmp_path / "w.png"), wide[:, 3:13])


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"bad\.jpg is not a readable image"):
        read_image(tmp_path / "bad.jpg")
