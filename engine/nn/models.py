"""Networks: a registry of encoders (MONAI ViT, MONAI ResNet-18) and the multi-head model.

Every model in umim is a :class:`MultiHeadNet`: one shared encoder and one linear head per
domain. Its ``state_dict`` keys are ``encoder.*`` and ``heads.<domain>.*``; strategies
exchange those tensors, never modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from engine.config import ModelConfig
from engine.data.unify import UNIFIED_CHANNELS, UNIFIED_SIZE

ENCODER_PREFIX = "encoder."
HEAD_PREFIX = "heads."


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


class ResNet18Encoder(nn.Module):
    """MONAI ``ResNet`` (basic blocks, 2-2-2-2) for 28 x 28: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        self.resnet = ResNet(block="basic", layers=(2, 2, 2, 2),
                             block_inplanes=(64, 128, 256, 512), spatial_dims=2,
                             n_input_channels=UNIFIED_CHANNELS, conv1_t_size=3,
                             conv1_t_stride=1, no_max_pool=True, feed_forward=False)
        self.out_features = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x)


ENCODERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "vit": ViTEncoder,
    "resnet18": ResNet18Encoder,
}


def register_encoder(name: str, factory: Callable[[ModelConfig], nn.Module]) -> None:
    """Add an encoder to the registry (it must expose ``out_features``)."""
    ENCODERS[name] = factory


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
        self.encoder = encoder
        self.heads = nn.ModuleDict()
        for domain, num_classes in heads.items():
            self.add_head(domain, num_classes)

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
    if cfg.arch not in ENCODERS:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; registered: {sorted(ENCODERS)}")
    return MultiHeadNet(ENCODERS[cfg.arch](cfg), heads)


def split_state(state: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Split a ``MultiHeadNet`` state into encoder tensors and per-domain head tensors."""
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(HEAD_PREFIX):
            domain = key[len(HEAD_PREFIX):].split(".", 1)[0]
            heads.setdefault(domain, {})[key] = value
    return encoder, heads
