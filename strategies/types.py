"""The vocabulary shared by strategies and the engine that runs them.

Only plain Python, NumPy and torch types live here; nothing imports Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

TaskType = Literal["binary", "multi-class", "ordinal", "multi-label"]
"""A client's task, as announced at onboarding. Ordinal is scored as multi-class."""

TASK_TYPES: tuple[str, ...] = get_args(TaskType)

State = dict[str, torch.Tensor]
"""Model tensors by ``state_dict`` key: the encoder's and each domain's head's (see
:mod:`strategies.state`)."""

POOLED_CID = "pooled"
"""Client id of the pooled oracle client (every domain's training data in one client), which
the engine starts for strategies that declare ``pooled``."""


@dataclass(frozen=True)
class ClientInfo:
    """What a client announces when it joins: never data, only its task.

    Attributes
    ----------
    cid
        Client id, e.g. ``"breast"`` or ``"pneumonia#3"``.
    domains
        The domain(s) whose data the client holds (one, except a pooled oracle client).
    tasks
        Domain -> task type.
    num_classes
        Domain -> number of classes (head width).
    num_train
        Number of training examples (the FedAvg weight).
    """

    cid: str
    domains: tuple[str, ...]
    tasks: Mapping[str, TaskType]
    num_classes: Mapping[str, int]
    num_train: int


@dataclass
class FitIns:
    """What the server asks a client to train.

    ``state`` is loaded into the client's model (encoder and/or heads); heads listed in
    ``fresh_heads`` are initialised anew from ``config["seed"]``. ``config`` may hold
    ``epochs``, ``lr``, ``proximal_mu``, ``select_on_val`` and ``score_pool`` (return
    :attr:`FitRes.pool_scores`).
    """

    state: State
    fresh_heads: tuple[str, ...] = ()
    config: dict[str, float | int | bool | str] = field(default_factory=dict)


@dataclass
class FitRes:
    """What a client sends back after training: weights and scalar metrics, and, when the
    server asked for them (``config["score_pool"]``), one score per *public* pool image;
    nothing else.

    Attributes
    ----------
    cid
        Client id.
    state
        The trained weights.
    num_examples
        Number of training examples.
    metrics
        Scalar training metrics.
    pool_scores
        ``(pool size,)`` float32 in ``[0, 1]``: how much each image of the server's public
        pool (in the distillation's order) looks like the client's own data; ``None``
        unless asked for.
    """

    cid: str
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    pool_scores: torch.Tensor | None = None


@dataclass
class EvaluateIns:
    """The model a client should score on its own ``split`` (``"val"`` or ``"test"``)."""

    state: State
    split: str = "val"


@dataclass
class EvaluateRes:
    """Per-domain scalar metrics (``auc``, ``acc``, ``loss``) a client computed locally."""

    cid: str
    split: str
    metrics: dict[str, dict[str, float]]
    num_examples: int
