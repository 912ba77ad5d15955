"""Data augmentation of training batches with MONAI's random array transforms.

``train.augment`` lists augmentations by name, each with its own options (see the classes
below); in YAML a bare name takes the defaults::

    train:
      augment: [flip, {name: rotate, prob: 0.5, degrees: 15}, intensity]

:class:`BatchAugment` applies them, in the listed order, to every training batch of a
client's :meth:`~engine.fl.client.Client.fit` (fine-tuning included, since it trains through
``fit``; scoring never augments), on the batch's own device, as batched tensor operations.
MONAI's random array transforms take one channel-first image at a time (a Python loop over
the batch: flip + rotate took 0.9 s per batch of 64, three times the quickstart ViT's
training step on a 2-core CPU), so each
augmentation draws its per-image choices (applied or not, with ``prob``; its angle, factor,
offset or noise) from its own NumPy ``RandomState`` as MONAI's ``Rand*`` transforms do, and
applies them to the whole batch with MONAI's batch-capable pieces: ``Flip`` on the chosen
images folded into channels (as :mod:`engine.data.unify` folds a batch for ``Resize``),
``monai.networks.layers.AffineTransform`` with one rotation matrix per image (what
``monai.transforms.Rotate`` runs, image by image; they agree to 1e-5), and the one-line
arithmetic of ``ScaleIntensity`` (``x * (1 + f)``), ``ShiftIntensity`` (``x + o``) and
``GaussianNoise``. The generators are seeded from the fit's seed, so a run is reproducible
and the torch generators that order the batches are not touched: an empty list leaves
training bit-identical to no augmentation at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch


def _check_prob(name: str, prob: float) -> None:
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"augment {name}: prob must be in [0, 1], got {prob}")


@dataclass(frozen=True)
class AugmentOptions:
    """The options every augmentation has.

    Attributes
    ----------
    prob
        Chance that the transform is applied to an image (drawn per image).
    """

    name: ClassVar[str] = ""
    prob: float = 0.5

    def __post_init__(self) -> None:
        _check_prob(self.name, self.prob)

    def apply(self, x: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        """``(B, C, H, W)`` images -> a new tensor with the augmentation applied to each
        image drawn (with ``prob``) from ``rng``; the others are copied unchanged."""
        chosen = np.flatnonzero(rng.random_sample(len(x)) < self.prob)
        params = self.draw(rng, len(x))
        out = x.clone()
        if len(chosen):
            idx = torch.from_numpy(chosen).to(x.device)
            out[idx] = self.transform_batch(x[idx], params[chosen]).to(x.dtype)
        return out

    def draw(self, rng: np.random.RandomState, n: int) -> np.ndarray:
        """Per image, the augmentation's random parameter (none: zeros)."""
        return np.zeros(n)

    def transform_batch(self, x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        """The augmentation of the chosen images ``x`` with their ``params``."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """The YAML form: ``{name: ..., <option>: ...}``."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Flip(AugmentOptions):
    """As ``monai.transforms.RandFlip``: mirror the image along ``axes``.

    Attributes
    ----------
    axes
        Spatial axes to flip together: ``0`` rows (upside down), ``1`` columns (left-right).
    """

    name: ClassVar[str] = "flip"
    axes: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
        if not self.axes or any(a not in (0, 1) for a in self.axes):
            raise ValueError(f"augment flip: axes must be a non-empty list of 0 and/or 1, "
                             f"got {list(self.axes)}")

    def transform_batch(self, x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        from monai.transforms import Flip as MonaiFlip
        from monai.utils import convert_to_tensor

        k, c = x.shape[:2]  # the images folded into channels: one channel-first image
        flipped = MonaiFlip(spatial_axis=list(self.axes))(x.reshape(k * c, *x.shape[2:]))
        return convert_to_tensor(flipped, track_meta=False).reshape(x.shape)


@dataclass(frozen=True)
class Rotate(AugmentOptions):
    """As ``monai.transforms.RandRotate``: rotate by an angle drawn uniformly from
    ``[-degrees, degrees]`` (bilinear, zero padding, same size).

    Attributes
    ----------
    degrees
        Largest rotation, in degrees, in (0, 180].
    """

    name: ClassVar[str] = "rotate"
    degrees: float = 15.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.degrees <= 180.0:
            raise ValueError(f"augment rotate: degrees must be in (0, 180], got {self.degrees}")

    def draw(self, rng: np.random.RandomState, n: int) -> np.ndarray:
        limit = math.radians(self.degrees)
        return rng.uniform(-limit, limit, n)

    def transform_batch(self, x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        from monai.networks.layers import AffineTransform

        angle = torch.as_tensor(params, dtype=torch.float32, device=x.device)
        theta = torch.zeros(len(x), 3, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
        theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
        theta[:, 2, 2] = 1.0
        rotate = AffineTransform(normalized=False, zero_centered=True, mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
        return rotate(x.float().contiguous(), theta)


@dataclass(frozen=True)
class Intensity(AugmentOptions):
    """As ``monai.transforms.RandScaleIntensity``: multiply the image by ``1 + f``, ``f``
    drawn uniformly from ``[-factor, factor]``.

    Attributes
    ----------
    factor
        Largest relative change, in (0, 1).
    """

    name: ClassVar[str] = "intensity"
    factor: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"augment intensity: factor must be in (0, 1), got {self.factor}")

    def draw(self, rng: np.random.RandomState, n: int) -> np.ndarray:
        return rng.uniform(-self.factor, self.factor, n)

    def transform_batch(self, x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        factor = torch.as_tensor(params, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        return x * (1.0 + factor)


@dataclass(frozen=True)
class Shift(AugmentOptions):
    """As ``monai.transforms.RandShiftIntensity``: add an offset drawn uniformly from
    ``[-offset, offset]`` (the images are normalised: units of the domain's std).

    Attributes
    ----------
    offset
        Largest offset, > 0.
    """

    name: ClassVar[str] = "shift"
    offset: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.offset > 0.0:
            raise ValueError(f"augment shift: offset must be > 0, got {self.offset}")

    def draw(self, rng: np.random.RandomState, n: int) -> np.ndarray:
        return rng.uniform(-self.offset, self.offset, n)

    def transform_batch(self, x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        offset = torch.as_tensor(params, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
        return x + offset


@dataclass(frozen=True)
class Noise(AugmentOptions):
    """As ``monai.transforms.RandGaussianNoise``: add zero-mean Gaussian noise.

    Attributes
    ----------
    std
        The noise's standard deviation (units of the domain's std), > 0.
    """

    name: ClassVar[str] = "noise"
    std: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.std > 0.0:
            raise ValueError(f"augment noise: std must be > 0, got {self.std}")

    def apply(self, x: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
        chosen = np.flatnonzero(rng.random_sample(len(x)) < self.prob)
        out = x.clone()
        if len(chosen):  # drawn on the CPU, as MONAI's RandGaussianNoise draws it
            noise = rng.normal(0.0, self.std, size=(len(chosen), *x.shape[1:]))
            idx = torch.from_numpy(chosen).to(x.device)
            out[idx] = x[idx] + torch.from_numpy(noise).to(device=x.device, dtype=x.dtype)
        return out


AUGMENTS: dict[str, type[AugmentOptions]] = {
    cls.name: cls for cls in (Flip, Rotate, Intensity, Shift, Noise)}
"""Every augmentation by its ``train.augment`` name."""


def augment_class(name: str) -> type[AugmentOptions]:
    """The options class of augmentation ``name``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the choices).
    """
    if name not in AUGMENTS:
        raise ValueError(f"unknown augmentation {name!r}; choices: {sorted(AUGMENTS)}")
    return AUGMENTS[name]


def parse_augment(item: str | Mapping[str, Any] | AugmentOptions, where: str,
                  build: Callable[[type, Mapping[str, Any], str], AugmentOptions]
                  ) -> AugmentOptions:
    """One ``train.augment`` entry as its options: a name, a ``{name: ..., ...}`` mapping
    (its other keys built by ``build(cls, options, where)``, the config loader's checked
    constructor) or options already built.

    Raises
    ------
    ValueError
        A one-line message naming ``where`` for an unknown name or a malformed entry.
    """
    if isinstance(item, AugmentOptions):
        return item
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
        name, options = item["name"], {k: v for k, v in item.items() if k != "name"}
    else:
        raise ValueError(f"{where}: expected an augmentation name or a mapping with a 'name' "
                         f"key, got {item!r}; choices: {sorted(AUGMENTS)}")
    try:
        cls = augment_class(name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return build(cls, options, where)


class BatchAugment:
    """The augmentations of ``train.augment`` applied to a batch of images.

    Parameters
    ----------
    augments
        The options of each augmentation, applied in this order.
    seed
        Seeds every augmentation's own ``RandomState`` (one child seed each): the same seed
        gives the same augmented batches.
    """

    def __init__(self, augments: Sequence[AugmentOptions], seed: int) -> None:
        children = np.random.SeedSequence(seed).spawn(len(augments))
        self.augments = list(augments)
        self.rngs = [np.random.RandomState(np.random.MT19937(c)) for c in children]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` images -> augmented images of the same shape, dtype, device and
        memory format (the input is not modified)."""
        out = x
        for augment, rng in zip(self.augments, self.rngs, strict=True):
            out = augment.apply(out, rng)
        if out is x:
            out = x.clone()
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out
