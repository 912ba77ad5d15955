"""The keys of a model state, in one place.

Every model in umim is one shared encoder plus one head per domain; its ``state_dict`` keys
are ``encoder.*`` and ``heads.<domain>.*``. This module is the only home of those two
prefixes: strategies, the engine's networks and its trainers select tensors through the
helpers below, never by spelling a prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.types import State

ENCODER_PREFIX = "encoder."
HEADS_PREFIX = "heads."


def select(state: Mapping[str, torch.Tensor], prefix: str) -> State:
    """The tensors of ``state`` whose key starts with ``prefix``."""
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def head_prefix(domain: str) -> str:
    """Key prefix of the head of ``domain`` (``heads.<domain>.``)."""
    return f"{HEADS_PREFIX}{domain}."


def is_encoder_key(key: str) -> bool:
    """Whether ``key`` names an encoder tensor."""
    return key.startswith(ENCODER_PREFIX)


def is_head_key(key: str, domain: str | None = None) -> bool:
    """Whether ``key`` names a head tensor (of ``domain``, if given)."""
    return key.startswith(HEADS_PREFIX if domain is None else head_prefix(domain))


def encoder_of(state: Mapping[str, torch.Tensor]) -> State:
    """The encoder tensors of a model state."""
    return select(state, ENCODER_PREFIX)


def head_of(state: Mapping[str, torch.Tensor], domain: str) -> State:
    """The head tensors of ``domain`` in a model state."""
    return select(state, head_prefix(domain))


def heads_of(state: Mapping[str, torch.Tensor], domains: Sequence[str] | None = None) -> State:
    """The head tensors of ``domains`` (every head when ``None``)."""
    if domains is None:
        return select(state, HEADS_PREFIX)
    return {k: v for d in domains for k, v in head_of(state, d).items()}


def head_domains(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The domains that have a head in ``state``, in key order."""
    return list(dict.fromkeys(k[len(HEADS_PREFIX):].split(".", 1)[0] for k in state
                              if k.startswith(HEADS_PREFIX)))


def encoder_key(name: str) -> str:
    """The state key of encoder parameter ``name`` (e.g. ``vit.norm.weight``)."""
    return f"{ENCODER_PREFIX}{name}"
