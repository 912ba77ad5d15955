"""Bring every domain to one input format: ``3 x 28 x 28``, normalised per domain.

Grey images repeat their channel, RGB images move channels first, 3D volumes become their
three orthogonal central slices (2.5D) as channels, and any other size than 28 is resized
with area interpolation (MONAI ``Resize``); images of mixed sizes are unified per size
(:func:`unify_image_list`). The unified images are stored as uint8; they
become normalised float tensors once, when a client loads its shard.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

UNIFIED_SIZE = 28
UNIFIED_CHANNELS = 3
UNIFIED_SHAPE: tuple[int, int, int] = (UNIFIED_CHANNELS, UNIFIED_SIZE, UNIFIED_SIZE)
_CHUNK = 2048


def central_slices(volumes: np.ndarray) -> np.ndarray:
    """``(N, D, H, W)`` volumes -> ``(N, 3, S, S)`` axial, coronal and sagittal central slices."""
    if volumes.ndim != 4 or len(set(volumes.shape[1:])) != 1:
        raise ValueError(f"expected cubic volumes (N, S, S, S), got {volumes.shape}")
    d, h, w = (s // 2 for s in volumes.shape[1:])
    return np.stack([volumes[:, d, :, :], volumes[:, :, h, :], volumes[:, :, :, w]], axis=1)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Area-resize ``(N, C, H, W)`` uint8 images to ``size`` with MONAI, in chunks."""
    from monai.transforms import Resize

    n, c = images.shape[:2]
    resize = Resize(spatial_size=(size, size), mode="area")
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = torch.from_numpy(images[start:start + _CHUNK]).float()
        k = chunk.shape[0]
        # MONAI transforms take one channel-first image; a batch is folded into channels.
        resized = resize(chunk.reshape(k * c, *chunk.shape[2:]))
        resized = torch.as_tensor(resized).reshape(k, c, size, size)
        out[start:start + k] = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def unify_images(images: np.ndarray, *, spatial_dims: int, in_channels: int) -> np.ndarray:
    """Convert a batch of raw dataset images to uint8 ``(N, 3, 28, 28)``.

    Parameters
    ----------
    images
        ``(N, S, S)`` grey, ``(N, S, S, 3)`` RGB, or ``(N, S, S, S)`` volumes; uint8.
    spatial_dims
        2 for images, 3 for volumes.
    in_channels
        1 or 3 (2D only).
    """
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if spatial_dims == 3:
        chw = central_slices(images)
    elif in_channels == 1 and images.ndim == 3:
        chw = np.repeat(images[:, None], UNIFIED_CHANNELS, axis=1)
    elif in_channels == 3 and images.ndim == 4 and images.shape[-1] == 3:
        chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    else:
        raise ValueError(f"cannot unify images of shape {images.shape} "
                         f"(spatial_dims={spatial_dims}, in_channels={in_channels})")
    if chw.shape[-1] != UNIFIED_SIZE:
        chw = _resize(chw, UNIFIED_SIZE)
    return np.ascontiguousarray(chw)


def unify_image_list(images: Sequence[np.ndarray], *, spatial_dims: int, in_channels: int
                     ) -> np.ndarray:
    """:func:`unify_images` for single images of varying sizes: each group of equal shape is
    unified in one call, and the results keep the order of ``images``."""
    out = np.empty((len(images), *UNIFIED_SHAPE), dtype=np.uint8)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape].append(i)
    for index in groups.values():
        out[index] = unify_images(np.stack([images[i] for i in index]),
                                  spatial_dims=spatial_dims, in_channels=in_channels)
    return out


def normalisation_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (on the ``[0, 1]`` scale) of uint8 ``(N, C, H, W)`` images."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def to_float_tensor(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
                    ) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> normalised float32 tensor ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)
