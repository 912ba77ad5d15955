from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data.unify import (
    central_slices,
    normalisation_stats,
    to_float_tensor,
    unify_images,
)


def test_grey_images_repeat_their_channel() -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    out = unify_images(images, spatial_dims=2, in_channels=1)
    assert out.shape == (5, 3, 28, 28) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, c], images)


def test_rgb_images_move_channels_first() -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    out = unify_images(images, spatial_dims=2, in_channels=3)
    np.testing.assert_array_equal(out, images.transpose(0, 3, 1, 2))


def test_volumes_become_three_orthogonal_central_slices() -> None:
    vol = np.zeros((1, 28, 28, 28), dtype=np.uint8)
    vol[0, 14, :, :] = 10  # axial plane through the centre
    vol[0, :, 14, :] += 20  # coronal
    vol[0, :, :, 14] += 40  # sagittal
    out = unify_images(vol, spatial_dims=3, in_channels=1)
    assert out.shape == (1, 3, 28, 28)
    # the axial slice is all 10 except where the other two planes cross it
    assert out[0, 0, 0, 0] == 10 and out[0, 1, 0, 0] == 20 and out[0, 2, 0, 0] == 40
    np.testing.assert_array_equal(central_slices(vol)[0, 0], vol[0, 14])


def test_larger_images_are_area_resized() -> None:
    images = np.zeros((2, 64, 64), dtype=np.uint8)
    images[:, :32] = 200
    out = unify_images(images, spatial_dims=2, in_channels=1)
    assert out.shape == (2, 3, 28, 28)
    assert out[0, 0, 0, 0] == 200 and out[0, 0, -1, -1] == 0
    vol = np.full((1, 64, 64, 64), 77, dtype=np.uint8)
    assert (unify_images(vol, spatial_dims=3, in_channels=1) == 77).all()


def test_bad_input_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot unify"):
        unify_images(np.zeros((2, 28, 28, 4), np.uint8), spatial_dims=2, in_channels=3)
    with pytest.raises(ValueError, match="uint8"):
        unify_images(np.zeros((2, 28, 28), np.float32), spatial_dims=2, in_channels=1)


def test_normalisation_gives_zero_mean_unit_std() -> None:
    images = np.random.default_rng(1).integers(0, 256, (50, 3, 28, 28), dtype=np.uint8)
    mean, std = normalisation_stats(images)
    x = to_float_tensor(images, mean, std)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
