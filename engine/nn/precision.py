"""The one precision rule: which autocast dtype a setting means on a device.

``train.precision`` is honoured by every path that computes: the client's local training,
evaluation and fine-tuning, MIM pretraining, distillation and the benchmarks.

* ``auto``: bf16 autocast on CUDA, none (float32) elsewhere;
* ``bf16``: bf16 autocast on any device, the CPU included (CPU autocast runs bf16: the CI
  stand-in for CUDA autocast);
* ``fp32``: no autocast;
* ``fp16``: float16 autocast on CUDA only, with a :class:`torch.amp.GradScaler` scaling the
  loss (float16's range is narrow: unscaled gradients underflow). A CPU refuses it
  (:func:`autocast_dtype` raises): CPU autocast in float16 is not the GPU path, and bf16 is
  the CPU stand-in.

Only the forward pass runs under autocast; losses are computed on ``.float()`` outputs and
the weights stay float32. :func:`grad_scaler` and :func:`optimizer_step` are the one way a
training loop steps, so that fp16's scaler is honoured everywhere alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Literal, get_args

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None``: no autocast).

    Parameters
    ----------
    precision
        ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see the module docstring).
    device
        Where the forward pass runs.

    Raises
    ------
    ValueError
        For any other ``precision``, and for ``fp16`` on a device that is not CUDA.
    """
    check_precision(precision)
    kind = torch.device(device).type
    if precision == "fp16":
        if kind != "cuda":
            raise ValueError(f"train.precision=fp16 needs a CUDA device, this runs on {kind}; "
                             "use train.precision=bf16 on a CPU")
        return torch.float16
    if precision == "bf16" or (precision == "auto" and kind == "cuda"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` as ``precision`` says on ``device`` (disabled when it means none)."""
    dtype = autocast_dtype(precision, device)
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """The loss scaler ``precision`` needs on ``device``: a :class:`torch.amp.GradScaler`
    for ``fp16`` (CUDA only, see :func:`autocast_dtype`), ``None`` for every other setting
    (their losses and gradients are float32 or bf16, whose range needs no scaling)."""
    if autocast_dtype(precision, device) != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None, *,
                   clip: float | None = None,
                   parameters: Iterable[torch.nn.Parameter] | None = None) -> None:
    """``loss.backward()``, optional global-norm clipping, ``optimizer.step()``.

    With a ``scaler`` (fp16) the loss is scaled before the backward pass, the gradients are
    unscaled before clipping, and the scaler steps (skipping a step whose gradients
    overflowed) and updates its scale. Without one this is exactly the plain sequence.

    Parameters
    ----------
    loss
        The batch's scalar loss (gradients are zeroed by the caller).
    optimizer
        The optimiser to step.
    scaler
        :func:`grad_scaler`'s result.
    clip
        Clip the global gradient norm of ``parameters`` to this value (``None``: no clip).
    parameters
        The parameters to clip (required with ``clip``).
    """
    if scaler is None:
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(parameters or ()), clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(parameters or ()), clip)
    scaler.step(optimizer)
    scaler.update()
