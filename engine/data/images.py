"""Read one image file of any size and mode into a square uint8 grey or RGB array.

With PIL: the EXIF orientation is applied; 1-bit, 8-bit grey and grey + alpha become grey;
16-bit, 32-bit integer and float grey are min-max scaled per image to 0..255 (a constant
image becomes 0); palette, RGB, RGBA, CMYK and other colour modes become RGB (alpha is
dropped). A non-square image is centre-cropped to a square of its shorter side. The result
goes to :func:`~engine.data.unify.unify_images` like every other source's images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.data.errors import DataError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})
_GREY_8BIT = {"1", "L", "LA", "La"}
_GREY_WIDE = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    x = values.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.round((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_uint8(image: Image.Image) -> np.ndarray:
    """``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 pixels of a PIL image (see the module)."""
    if image.mode in _GREY_8BIT:
        return np.asarray(image.convert("L"))
    if image.mode in _GREY_WIDE:
        return _scale_to_uint8(np.asarray(image))
    return np.asarray(image.convert("RGB"))


def centre_crop(pixels: np.ndarray) -> np.ndarray:
    """The central square of ``(H, W[, C])`` pixels (side ``min(H, W)``)."""
    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.ascontiguousarray(pixels[top:top + side, left:left + side])


def read_image(path: Path) -> np.ndarray:
    """A square uint8 ``(S, S)`` grey or ``(S, S, 3)`` RGB array of the image at ``path``.

    Raises
    ------
    DataError
        When the file cannot be decoded, naming it.
    """
    try:
        with Image.open(path) as image:
            pixels = to_uint8(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path} is not a readable image ({type(err).__name__}: {err})"
                        ) from err
    if min(pixels.shape[:2]) == 0:
        raise DataError(f"{path} is an empty image (shape {pixels.shape})")
    return centre_crop(pixels)
