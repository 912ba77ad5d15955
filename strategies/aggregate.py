"""Aggregation as pure functions over model states (dicts of tensors)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from strategies.types import State


def nonfinite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of ``state`` whose tensors hold NaN or Inf (empty when the update is clean)."""
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                     keys: Iterable[str] | None = None) -> State:
    """Average ``states`` key by key, weighted by ``weights`` (e.g. sample counts).

    The sum runs in float64 in the given order, so the result does not depend on which
    client finished first when callers pass states in a fixed (client id) order. Integer
    tensors (e.g. BatchNorm's ``num_batches_tracked``) take the value of the first state.

    Parameters
    ----------
    states
        Client states, all holding ``keys``.
    weights
        Non-negative weights, one per state, not all zero.
    keys
        Which tensors to average (default: all keys of the first state).
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and "
                         f"{len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be non-negative, finite and not all zero: {weights}")
    out: State = {}
    for key in list(keys) if keys is not None else list(states[0]):
        first = states[0][key]
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(first.dtype)
    return out
