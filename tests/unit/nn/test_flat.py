"""FlatParams (engine.nn.flat): a module's state as views of one flat tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.nn.flat import FlatParams
from engine.nn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cnn(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="cnn", hidden_size=16, num_heads=2, options={"channels": (4, 8)})
    net = build_model(cfg, {"d": 3, "e": 2})
    return net.to(memory_format=torch.channels_last) if channels_last else net


@pytest.mark.parametrize("channels_last", [False, True])
def test_round_trip_and_in_place_load(channels_last: bool) -> None:
    net = cnn(channels_last)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    flat = FlatParams(net)
    assert flat.numel == sum(v.numel() for v in before.values())
    for key, value in net.state_dict().items():  # values kept, layout kept, storage shared
        assert torch.equal(value, before[key])
        assert value.stride() == before[key].stride()
        assert value.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr()
    exported = flat.export()
    state = flat.to_state(exported)
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert torch.equal(flat.from_state(before), exported)

    other = {k: torch.randn_like(v) for k, v in before.items()}
    flat.load_(flat.from_state(other))
    x = torch.randn(5, 3, 28, 28)
    reference = cnn(channels_last)
    reference.load_state_dict(other)
    assert torch.equal(net(x, "d"), reference(x, "d"))
    assert not torch.equal(exported, flat.export())  # the export was a copy


def test_training_writes_into_the_flat_tensor() -> None:
    net = cnn()
    flat = FlatParams(net)
    start = flat.export()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(net(torch.randn(4, 3, 28, 28), "d"), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    moved = flat.to_state(flat.export())
    for key, value in net.state_dict().items():
        assert torch.equal(moved[key], value)
    assert not torch.equal(flat.flat, start)
    head = flat.to_state(start)["heads.e.weight"]  # no gradient: unchanged
    assert torch.equal(net.state_dict()["heads.e.weight"], head)


def test_bad_inputs_are_refused() -> None:
    flat = FlatParams(cnn())
    with pytest.raises(ValueError, match="elements"):
        flat.load_(torch.zeros(3))
    state = flat.to_state(flat.export())
    with pytest.raises(ValueError, match="missing"):
        flat.from_state({k: v for k, v in state.items() if k != "heads.d.bias"})
    with pytest.raises(ValueError, match="shape"):
        flat.from_state({**state, "heads.d.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="dtypes"):
        FlatParams(nn.BatchNorm1d(3))  # float running stats beside an int64 counter
