"""engine.cluster.transport: a tensor's wire form keeps its values, dtype and shape exactly,
is a plain array Ray moves out of band, and comes back writable and independent."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from engine.cluster.transport import decode_tensor, encode_tensor


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 4), torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last),
    torch.randn(4, 6)[:, ::2], torch.tensor(3.5), torch.arange(7), torch.zeros(0, 3),
    torch.randn(5).to(torch.bfloat16), torch.randn(5).half(), torch.rand(4) > 0.5,
    torch.randint(0, 255, (9,), dtype=torch.uint8), torch.randn(3, dtype=torch.float64)])
def test_round_trip_is_exact(tensor: torch.Tensor) -> None:
    wire = encode_tensor(tensor)
    assert wire[0] == "raw" and isinstance(wire[3], np.ndarray)
    back = decode_tensor(pickle.loads(pickle.dumps(wire, protocol=5)))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor) and back.is_contiguous()
    if back.numel():
        back.add_(1) if back.dtype != torch.bool else back.logical_not_()
        assert not torch.equal(back, tensor)  # writable, and not the sender's memory


def test_a_tensor_that_needs_grad_keeps_torch_pickling() -> None:
    tensor = torch.randn(3, requires_grad=True)
    wire = encode_tensor(tensor)
    assert wire[0] == "torch"
    back = decode_tensor(wire)
    assert back.requires_grad and torch.equal(back.detach(), tensor.detach())


def test_the_wire_form_pickles_out_of_band() -> None:
    wire = encode_tensor(torch.randn(1000))
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(wire, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and len(data) < 500  # the 4 kB of values travel apart
    assert torch.equal(decode_tensor(pickle.loads(data, buffers=buffers)),
                       decode_tensor(wire))
