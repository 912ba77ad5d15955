"""The one precision rule: which autocast dtype a setting means on a device.

``train.precision`` is honoured by every path that computes: the client's local training,
evaluation and fine-tuning, MIM pretraining, distillation and the benchmarks.

* ``auto``: bf16 autocast on CUDA, none (float32) elsewhere;
* ``bf16``: bf16 autocast on any device, the CPU included (CPU autocast runs bf16: the CI
  stand-in for CUDA autocast);
* ``fp32``: no autocast.

Only the forward pass runs under autocast; losses are computed on ``.float()`` outputs and
the weights stay float32.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None``: no autocast).

    Parameters
    ----------
    precision
        ``auto``, ``fp32`` or ``bf16`` (see the module docstring).
    device
        Where the forward pass runs.

    Raises
    ------
    ValueError
        For any other ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "bf16" or (precision == "auto" and kind == "cuda"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` as ``precision`` says on ``device`` (disabled when it means none)."""
    dtype = autocast_dtype(precision, device)
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
