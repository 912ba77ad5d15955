"""The one precision rule (engine.nn.precision)."""

from __future__ import annotations

import pytest
import torch

from engine.nn.precision import autocast, autocast_dtype


@pytest.mark.parametrize(("precision", "device", "expected"), [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16),
    ("bf16", "cpu", torch.bfloat16), ("bf16", "cuda", torch.bfloat16),
    ("fp32", "cpu", None), ("fp32", "cuda", None), ("auto", "cuda:1", torch.bfloat16)])
def test_precision_rule(precision: str, device: str, expected: torch.dtype | None) -> None:
    assert autocast_dtype(precision, torch.device(device)) == expected
    assert autocast_dtype(precision, device) == expected


def test_unknown_precision_is_an_error() -> None:
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", "cpu")


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16),
                                                  ("auto", torch.float32),
                                                  ("fp32", torch.float32)])
def test_autocast_context_on_cpu(precision: str, dtype: torch.dtype) -> None:
    layer = torch.nn.Linear(4, 4)
    with autocast(precision, "cpu"):
        out = layer(torch.randn(2, 4))
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16")
    assert out.dtype == dtype
