"""Whether an encoder can train under DP-SGD: Opacus's per-sample gradients, tried for real.

DP-SGD (:mod:`engine.fl.dpsgd`) clips every sample's gradient, so a network must not mix the
samples of a batch (BatchNorm does) and every trainable layer must yield per-sample
gradients under Opacus's hooks (in-place activations on a hooked module's output do not).
:func:`dp_incompatibility` builds the network and asks both, so a config is refused at load
with the reason instead of failing in a client's first round.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import torch

from engine.data.unify import UNIFIED_CHANNELS, UNIFIED_SIZE
from engine.nn.models import build_model

if TYPE_CHECKING:  # the config layer sits above this one; only its shape is used here
    from engine.config import ModelConfig

logger = logging.getLogger(__name__)

BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect"
"""Torch's warning on Opacus's hooks when the images need no gradient: expected, harmless."""


def dp_incompatibility(cfg: ModelConfig) -> str | None:
    """Why encoder ``cfg`` cannot train under DP-SGD with Opacus, or ``None`` when it can.

    The network (with one two-class head) is checked by
    ``opacus.validators.ModuleValidator`` (BatchNorm and other layers DP forbids), then one
    forward and backward pass of two random images through Opacus's
    ``GradSampleModule`` must give every trainable parameter a per-sample gradient. The
    global random state is left as it was.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, {"probe": 2})
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            first = str(errors[0]).split(". ")[0]
            return f"{len(errors)} layer(s) Opacus refuses, e.g. {first}"
        wrapped = GradSampleModule(model)
        try:
            x = torch.randn(2, UNIFIED_CHANNELS, UNIFIED_SIZE, UNIFIED_SIZE)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=BACKWARD_HOOK_WARNING)
                wrapped(x, "probe").sum().backward()
            # a parameter the forward never uses (MONAI's unused cross-attention norms) gets
            # no gradient at all and is left out of DP training; one that gets a gradient
            # must get per-sample ones
            missing = [n for n, p in model.named_parameters()
                       if p.grad is not None and getattr(p, "grad_sample", None) is None]
        except RuntimeError as err:
            return f"Opacus cannot compute its per-sample gradients ({str(err)[:160]})"
        finally:
            wrapped.cleanup()
    if missing:
        return f"no per-sample gradient for {missing[:3]}"
    return None


def used_parameters(model: torch.nn.Module, x: torch.Tensor, *args: object
                    ) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model`` that a forward pass of ``x`` (and ``args``)
    reaches: the ones that get a gradient from one backward pass, which leaves the
    gradients cleared. DP-SGD optimises exactly these (a trainable parameter no input
    reaches would have no per-sample gradient)."""
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        model(x, *args).float().sum().backward()
    used = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return used
