"""The small stateless CNN of the cross-device benchmark (``model.arch=cnn``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from engine.config import ConfigError, load_config
from engine.nn.models import build_model

CNN = ["model.arch=cnn", "model.hidden_size=64", "model.num_heads=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(*overrides: str, classes: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None, [*CNN, *overrides]).model, {"d": classes})


def test_it_maps_images_to_features_and_trains() -> None:
    model = _model()
    assert model.out_features == 64
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 150_000
    # stateless: no normalisation statistics, no dropout, nothing but parameters
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout)
                   for m in model.modules())
    assert not list(model.buffers())
    x, y = torch.randn(5, 3, 28, 28), torch.randint(0, 6, (5,))
    loss = nn.functional.cross_entropy(model(x, "d"), y)
    loss.backward()
    assert model(x, "d").shape == (5, 6)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
               for p in model.parameters())
    # train mode and eval mode compute the same function (nothing depends on the mode)
    model.eval()
    out = model(x, "d")
    model.train()
    assert torch.equal(out, model(x, "d"))


def test_several_clients_steps_stack_with_vmap() -> None:
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys = torch.randn(3, 8, 3, 28, 28), torch.randint(0, 6, (3, 8))
    starts = {k: torch.stack([v + 0.01 * i for i in range(3)]) for k, v in params.items()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x, "d")), y)

    stacked = vmap(grad(loss))(starts, xs, ys)
    for i in range(3):
        one = grad(loss)({k: v[i] for k, v in starts.items()}, xs[i], ys[i])
        for key in params:
            torch.testing.assert_close(stacked[key][i], one[key], rtol=1e-5, atol=1e-6)


def test_options_set_the_widths_and_dimensions() -> None:
    narrow = _model("model.options={channels: [8]}")
    assert narrow.encoder.fc.in_features == 8 * 14 * 14
    volume = _model("model.options={spatial_dims: 3, in_channels: 1, channels: [4, 4]}")
    assert volume(torch.randn(2, 1, 28, 28, 28), "d").shape == (2, 6)


@pytest.mark.parametrize(("option", "message"), [
    ("{channels: []}", "model.options.channels must be one or more"),
    ("{spatial_dims: 1}", "model.options.spatial_dims must be 2 or 3"),
    ("{in_channels: 0}", "model.options.in_channels must be >= 1"),
    ("{width: 8}", "model.options"),
])
def test_bad_options_are_refused_at_load(option: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*CNN, f"model.options={option}"])
