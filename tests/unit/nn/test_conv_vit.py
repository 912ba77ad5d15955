"""The convolutional-stem ViT for 28 x 28 (``model.arch=vit_conv``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import ConfigError, load_config
from engine.nn.models import build_model

TINY = ["model.arch=vit_conv", "model.hidden_size=32", "model.mlp_dim=64",
        "model.num_layers=1", "model.num_heads=4", "model.options={stem_channels: 8}"]


def test_it_maps_images_to_features_on_7x7_tokens_without_batchnorm() -> None:
    model = build_model(load_config(None, TINY).model, {"breast": 2})
    assert model.out_features == 32
    assert model.encoder.pos_embed.shape == (1, 49, 32)
    assert model(torch.randn(3, 3, 28, 28), "breast").shape == (3, 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(k.startswith(("encoder.", "heads.")) for k in model.state_dict())


def test_it_learns_a_separable_task() -> None:
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY).model, {"d": 2})
    x = torch.randn(64, 3, 28, 28)
    y = (x[:, 0, :14].mean(dim=(1, 2)) > x[:, 0, 14:].mean(dim=(1, 2))).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x, "d"), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.options={stem_channels: 0}"], "model.options.stem_channels must be >= 1"),
    (["model.options={stem: 8}"], r"model.options"),
    (["pretrain.method=mim"], "pretrain.method=mim needs model.arch=vit"),
])
def test_bad_options_are_refused_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY[:-1], *overrides])
