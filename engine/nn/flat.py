"""A module's state as slices of one preallocated flat tensor.

:class:`FlatParams` rebinds every parameter and buffer of a module (``p.data = view``) to a
view of one flat tensor, so loading a whole received model is one copy
(:meth:`FlatParams.load_`) and exporting it is one clone (:meth:`FlatParams.export`), in
place of ``load_state_dict`` and one copy per tensor. :meth:`~FlatParams.to_state` and
:meth:`~FlatParams.from_state` map a flat tensor to and from the engine's state dicts
(``module.state_dict()`` key names).

Each tensor keeps its own memory layout inside the flat tensor (a ``channels_last``
convolution weight stays ``channels_last``), so a flat tensor is meaningful only to a
:class:`FlatParams` of the same module structure and layout (:attr:`FlatParams.layout`).
Anything that rebinds a parameter afterwards (``module.to(device)``, replacing a submodule,
``MultiHeadNet.add_head``) detaches it from the flat tensor: build a new
:class:`FlatParams` then. ``load_state_dict`` and optimisers write in place, so they keep
working (and write into the flat tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Slot:
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.as_strided(self.shape, self.stride, self.offset)


class FlatParams:
    """Every tensor of ``module.state_dict()`` as a view of one flat tensor.

    Parameters
    ----------
    module
        The module; its parameters and buffers are rebound to views of :attr:`flat`
        (values unchanged). All must share one dtype and device and be dense (any
        memory format). Tied tensors (one tensor under two keys) share one slot.

    Attributes
    ----------
    flat
        The 1-D tensor that holds the module's state.
    keys
        The state-dict keys, in ``state_dict`` order.

    Raises
    ------
    ValueError
        For mixed dtypes or devices, or a tensor that is not dense.
    """

    def __init__(self, module: nn.Module) -> None:
        tensors = module.state_dict(keep_vars=True)
        if not tensors:
            raise ValueError("FlatParams: the module has no parameters or buffers")
        kinds = {(t.dtype, t.device) for t in tensors.values()}
        if len(kinds) > 1:
            raise ValueError(f"FlatParams: the module's tensors have several dtypes / "
                             f"devices {sorted(map(str, kinds))}; one flat tensor holds one")
        slots: dict[str, _Slot] = {}
        seen: dict[int, _Slot] = {}
        offset = 0
        for key, t in tensors.items():
            if id(t) in seen:
                slots[key] = seen[id(t)]
                continue
            if not _dense(t):
                raise ValueError(f"FlatParams: {key} is not a dense tensor (strides "
                                 f"{t.stride()})")
            slots[key] = seen[id(t)] = _Slot(offset, tuple(t.shape), tuple(t.stride()))
            offset += t.numel()
        (dtype, device), = kinds
        self.flat = torch.empty(offset, dtype=dtype, device=device)
        self.keys: tuple[str, ...] = tuple(tensors)
        self._slots = slots
        bound: set[int] = set()
        with torch.no_grad():
            for key, t in tensors.items():
                if id(t) in bound:
                    continue
                view = slots[key].view(self.flat)
                view.copy_(t)
                t.data = view
                bound.add(id(t))

    @property
    def layout(self) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]:
        """Each key's shape and strides: two instances of equal layout share flat tensors."""
        return tuple((k, self._slots[k].shape, self._slots[k].stride) for k in self.keys)

    @property
    def numel(self) -> int:
        """The flat tensor's length."""
        return int(self.flat.numel())

    @torch.no_grad()
    def load_(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` (from :meth:`export` or :meth:`from_state` of an equal layout)
        into the module, in place: one copy.

        Raises
        ------
        ValueError
            When ``flat`` is not a 1-D tensor of :attr:`numel` elements.
        """
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"FlatParams.load_: expected a 1-D tensor of {self.numel} "
                             f"elements, got shape {tuple(flat.shape)}")
        self.flat.copy_(flat)

    def export(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A copy of the module's state as one flat tensor on ``device``: one clone."""
        return self.flat.detach().to(device, copy=True)

    def to_state(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``flat`` as a state dict: one view of it per key (no copy; the module's memory
        layout of each tensor). Pickled, the views share the one storage."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"FlatParams.to_state: expected a 1-D tensor of {self.numel} "
                             f"elements, got shape {tuple(flat.shape)}")
        return {k: self._slots[k].view(flat) for k in self.keys}

    @torch.no_grad()
    def from_state(self, state: Mapping[str, torch.Tensor],
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """A state dict (every key of the module's, nothing else) as a flat tensor,
        written into ``out`` when given (else a new one beside :attr:`flat`).

        Raises
        ------
        ValueError
            For missing or unexpected keys, or a tensor of another shape.
        """
        missing = sorted(set(self.keys) - set(state))
        unexpected = sorted(set(state) - set(self.keys))
        if missing or unexpected:
            raise ValueError(f"FlatParams.from_state: the state does not fit the module "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        out = torch.empty_like(self.flat) if out is None else out
        for key in self.keys:
            slot = self._slots[key]
            if tuple(state[key].shape) != slot.shape:
                raise ValueError(f"FlatParams.from_state: {key} has shape "
                                 f"{tuple(state[key].shape)}, the module's is {slot.shape}")
            slot.view(out).copy_(state[key])
        return out


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``t.numel()`` consecutive elements (in any order of its
    dimensions): a permutation of a contiguous layout."""
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


__all__ = ["FlatParams"]
