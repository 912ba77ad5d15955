"""Networks: a registry of encoders (MONAI ViT, MONAI ResNet-18, a small CNN) and the multi-head
model.

Every model in umim is a :class:`MultiHeadNet`: one shared encoder and one linear head per
domain. Its ``state_dict`` keys are the encoder's and each head's (the prefixes live in
:mod:`strategies.state`); strategies exchange those tensors, never modules.

``model.arch`` names an encoder: a registered one (:func:`register_encoder`), an import path
``"package.module:factory"``, or an entry point of the group ``umim.encoders``. A factory
takes the model config (an object with ``arch``, ``options`` and the ViT sizes of
``engine.config.ModelConfig``) and returns a module mapping ``(B, 3, 28, 28)`` to
``(B, out_features)`` that exposes ``out_features``. Its own options travel in
``model.options``; declare them as a frozen dataclass (``register_encoder(..., options=)``
or an ``Options`` attribute of the factory) and they are validated when the config loads
and handed over typed by :func:`encoder_options`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.data.unify import UNIFIED_CHANNELS, UNIFIED_SIZE
from strategies.registry import Registry
from strategies.state import ENCODER_PREFIX, HEADS_PREFIX

if TYPE_CHECKING:  # the config layer sits above this one; only its shape is used here
    from engine.config import ModelConfig


class ViTEncoder(nn.Module):
    """MONAI ``ViT`` (no classification token) whose patch tokens are mean-pooled.

    Its parameter names (``vit.patch_embedding.*``, ``vit.blocks.*``, ``vit.norm.*``) are
    those of MONAI's ``MaskedAutoEncoderViT`` encoder, so an MAE base loads into it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        with warnings.catch_warnings():  # MONAI's sincos embedding calls meshgrid w/o indexing
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            self.vit = ViT(in_channels=UNIFIED_CHANNELS, img_size=UNIFIED_SIZE,
                           patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                           mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers,
                           num_heads=cfg.num_heads, pos_embed_type="sincos",
                           classification=False, dropout_rate=cfg.dropout, spatial_dims=2)
        self.out_features = cfg.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)
        return tokens.mean(dim=1)


@dataclass(frozen=True)
class ResNet18Options:
    """``model.options`` of ``resnet18``.

    Attributes
    ----------
    norm
        ``batch`` (BatchNorm, MONAI's default and today's network) or ``group`` (GroupNorm,
        8 groups, with out-of-place ReLUs and residual sums; the same parameter names, no
        running statistics): the one that trains under DP-SGD (``privacy.dp``), where
        BatchNorm would mix the samples of a batch and per-sample gradients are undefined.
    """

    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "group"):
            raise ValueError(f"model.options.norm must be 'batch' or 'group', got "
                             f"{self.norm!r}")


class ResNet18Encoder(nn.Module):
    """MONAI ``ResNet`` (basic blocks, 2-2-2-2) for 28 x 28: 3x3 stride-1 stem, no max-pool;
    BatchNorm, or GroupNorm with ``model.options.norm=group`` (:class:`ResNet18Options`)."""

    Options = ResNet18Options

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        opts = encoder_options(cfg) or ResNet18Options()
        self.resnet = ResNet(block="basic", layers=(2, 2, 2, 2),
                             block_inplanes=(64, 128, 256, 512), spatial_dims=2,
                             n_input_channels=UNIFIED_CHANNELS, conv1_t_size=3,
                             conv1_t_stride=1, no_max_pool=True, feed_forward=False)
        if opts.norm == "group":
            _to_group_norm(self.resnet)
        self.out_features = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x)


class _OutOfPlaceBasicBlock(nn.Module):
    """MONAI's basic ``ResNetBlock`` with the same submodules and an out-of-place residual
    sum (MONAI's adds in place, on a hooked norm's output, which Opacus's backward hooks
    cannot follow); set as the class of a built block by :func:`_to_group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


def _to_group_norm(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` under ``module`` by a ``GroupNorm`` (:func:`_groups`
    groups; weight 1, bias 0, as MONAI initialises its norms), make its ReLUs out-of-place
    and its basic blocks' residual sums too (:class:`_OutOfPlaceBasicBlock`), so that
    Opacus computes per-sample gradients. (MONAI's ``ResNet(norm=...)`` reaches only the
    stem, not its blocks.) Parameter names are unchanged."""
    from monai.networks.nets.resnet import ResNetBlock

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(_groups(child.num_features), child.num_features))
            continue
        if isinstance(child, nn.ReLU):
            child.inplace = False
        if type(child) is ResNetBlock:
            child.__class__ = _OutOfPlaceBasicBlock
        _to_group_norm(child)


@dataclass(frozen=True)
class ConvViTOptions:
    """``model.options`` of ``vit_conv``: the widths of its convolutional stem's three
    layers are ``stem_channels``, ``2 x stem_channels`` and ``hidden_size``."""

    stem_channels: int = 32

    def __post_init__(self) -> None:
        if self.stem_channels < 1:
            raise ValueError(f"model.options.stem_channels must be >= 1, got "
                             f"{self.stem_channels}")


class ConvViTEncoder(nn.Module):
    """A ViT for 28 x 28 with a convolutional stem (Xiao et al. 2021, "Early convolutions
    help transformers see better"): three 3x3 convolutions (stride 1, 2, 2; GroupNorm, GELU)
    turn the image into 7 x 7 tokens of ``hidden_size``, then MONAI ``TransformerBlock`` s
    with a fixed 2-D sin-cos position embedding; tokens are mean-pooled. It uses the sizes
    of ``model`` (``hidden_size``, ``mlp_dim``, ``num_layers``, ``num_heads``, ``dropout``);
    ``patch_size`` does not apply. GroupNorm, not BatchNorm, so it trains under DP-SGD.
    MONAI's MAE cannot pretrain it (``pretrain.method=mim`` needs ``vit``)."""

    Options = ConvViTOptions

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from monai.networks.blocks import TransformerBlock
        from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

        opts = encoder_options(cfg) or ConvViTOptions()
        widths = (opts.stem_channels, 2 * opts.stem_channels, cfg.hidden_size)
        layers: list[nn.Module] = []
        channels = UNIFIED_CHANNELS
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(_groups(width), width), nn.GELU()]
            channels = width
        self.stem = nn.Sequential(*layers)
        grid = UNIFIED_SIZE // 4
        with warnings.catch_warnings():  # MONAI's sincos embedding calls meshgrid w/o indexing
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            self.pos_embed = build_sincos_position_embedding(grid, cfg.hidden_size,
                                                             spatial_dims=2)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.hidden_size, cfg.mlp_dim,
                                                     cfg.num_heads, cfg.dropout)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.out_features = cfg.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens).mean(dim=1)


@dataclass(frozen=True)
class CNNOptions:
    """``model.options`` of ``cnn`` (MONAI's vocabulary).

    Attributes
    ----------
    spatial_dims
        2 for images (the engine's unified input is 2-D, ``3 x 28 x 28``), 3 for volumes.
    in_channels
        Input channels (default 3, the unified images' channels).
    channels
        Output channels of the strided 3x3 convolutions, one per layer (each halves the
        spatial size, rounding up).
    """

    spatial_dims: int = 2
    in_channels: int = UNIFIED_CHANNELS
    channels: tuple[int, ...] = (16, 32)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"model.options.spatial_dims must be 2 or 3, got "
                             f"{self.spatial_dims}")
        if self.in_channels < 1:
            raise ValueError(f"model.options.in_channels must be >= 1, got {self.in_channels}")
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"model.options.channels must be one or more positive widths, "
                             f"got {list(self.channels)}")


class CNNEncoder(nn.Module):
    """A small CNN for cross-device simulation: MONAI ``Convolution`` blocks (3x3, stride 2,
    ReLU; no normalisation, no dropout) then a fully connected ReLU layer of
    ``model.hidden_size`` features (the other ViT sizes do not apply).

    It keeps no state besides its parameters (no BatchNorm statistics, no dropout
    randomness), so a client's step depends only on the weights and the batch, and many
    clients' steps can be stacked with ``torch.func.vmap``. With the defaults (channels 16,
    32; ``hidden_size`` 64) it has about 105k parameters.
    """

    Options = CNNOptions

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        opts = encoder_options(cfg) or CNNOptions()
        layers: list[nn.Module] = []
        channels = opts.in_channels
        for width in opts.channels:
            layers.append(Convolution(opts.spatial_dims, channels, width, strides=2,
                                      kernel_size=3, act=("relu", {"inplace": False}),
                                      norm=None, dropout=None))
            channels = width
        self.convs = nn.Sequential(*layers)
        side = UNIFIED_SIZE
        for _ in opts.channels:
            side = (side + 1) // 2  # 3x3, stride 2, padding 1
        self.fc = nn.Linear(channels * side ** opts.spatial_dims, cfg.hidden_size)
        self.out_features = cfg.hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.convs(x).flatten(1)))


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide ``channels``, else the largest divisor <= 8."""
    return next(g for g in range(min(8, channels), 0, -1) if channels % g == 0)


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: its factory and the dataclass of its ``model.options``
    (``None``: it takes none)."""

    factory: Callable[[ModelConfig], nn.Module]
    options: type | None = None


ENCODERS: Registry[EncoderSpec] = Registry("encoder", "umim.encoders", {
    "vit": EncoderSpec(ViTEncoder),
    "resnet18": EncoderSpec(ResNet18Encoder, ResNet18Options),
    "vit_conv": EncoderSpec(ConvViTEncoder, ConvViTOptions),
    "cnn": EncoderSpec(CNNEncoder, CNNOptions),
})
"""Every registered encoder by ``model.arch`` name."""


def register_encoder(name: str, factory: Callable[[ModelConfig], nn.Module], *,
                     options: type | None = None) -> None:
    """Add an encoder to the registry (its modules must expose ``out_features``).

    Registered in the driver, it is installed in every process the engine starts (client
    actors, Train workers, Tune trials); see ``engine.config.plugins``.

    Parameters
    ----------
    name
        The ``model.arch`` name.
    factory
        ``factory(model_config) -> nn.Module``.
    options
        A frozen dataclass of the encoder's ``model.options`` (default: the factory's
        ``Options`` attribute, if any).
    """
    ENCODERS.register(name, EncoderSpec(factory, options or getattr(factory, "Options", None)))


def resolve_encoder(arch: str) -> EncoderSpec:
    """The encoder named ``arch``: registered, import path or entry point."""
    found = ENCODERS.resolve(arch)
    if isinstance(found, EncoderSpec):
        return found
    if not callable(found):
        raise ValueError(f"model.arch {arch!r} resolves to {found!r}, not a callable")
    return EncoderSpec(found, getattr(found, "Options", None))


def encoder_options(cfg: ModelConfig) -> Any:
    """``cfg.options`` as the encoder's options dataclass (``None`` when it declares none)."""
    spec = resolve_encoder(cfg.arch)
    if spec.options is None:
        return None
    return spec.options(**dict(cfg.options))


class MultiHeadNet(nn.Module):
    """A shared encoder with one linear head per domain.

    Parameters
    ----------
    encoder
        Module mapping ``(B, 3, 28, 28)`` to ``(B, encoder.out_features)``.
    heads
        Domain name -> number of output units.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, int]) -> None:
        super().__init__()
        self._tensors: dict[str, torch.Tensor] | None = None
        self.encoder = encoder
        self.heads = nn.ModuleDict()
        for domain, num_classes in heads.items():
            self.add_head(domain, num_classes)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors behind :meth:`state_dict`'s keys (parameters and buffers,
        not detached), kept between calls: loading a state into them in place, or exporting
        them, skips the module walk of ``state_dict`` / ``load_state_dict``. Rebuilt after
        :meth:`add_head` or a move (``.to``)."""
        if self._tensors is None:
            self._tensors = dict(self.state_dict(keep_vars=True))
        return self._tensors

    def _apply(self, fn: Any, recurse: bool = True) -> MultiHeadNet:
        self._tensors = None  # a move replaces buffers (and maybe parameters)
        return super()._apply(fn, recurse)

    def add_head(self, domain: str, num_classes: int, seed: int | None = None) -> nn.Linear:
        """Add (or replace) the head of ``domain``; with ``seed`` its init is reproducible."""
        head = nn.Linear(self.out_features, num_classes)
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            bound = 1.0 / self.out_features**0.5
            with torch.no_grad():
                head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 - 1)
                head.weight.mul_(bound)
                head.bias.copy_((torch.rand(num_classes, generator=generator) * 2 - 1) * bound)
        device = next(self.encoder.parameters()).device
        self.heads[domain] = head.to(device)
        self._tensors = None
        return head

    @property
    def out_features(self) -> int:
        """Width of the encoder's features."""
        return int(self.encoder.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features ``(B, out_features)``."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        """Logits of head ``domain``."""
        return self.heads[domain](self.encoder(x))


def build_model(cfg: ModelConfig, heads: Mapping[str, int]) -> MultiHeadNet:
    """Create a :class:`MultiHeadNet` from the registry (the one factory)."""
    encoder = resolve_encoder(cfg.arch).factory(cfg)
    if not isinstance(encoder, nn.Module) or not hasattr(encoder, "out_features"):
        raise TypeError(f"encoder {cfg.arch!r} must return an nn.Module with out_features")
    return MultiHeadNet(encoder, heads)


def split_state(state: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split a ``MultiHeadNet`` state into encoder tensors and per-domain head tensors."""
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(HEADS_PREFIX):
            domain = key[len(HEADS_PREFIX):].split(".", 1)[0]
            heads.setdefault(domain, {})[key] = value
    return encoder, heads
