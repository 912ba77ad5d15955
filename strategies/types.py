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
    arch
        The encoder family the client trains its teacher in when it is not the global
        model's (``model.domain_arch``); ``None`` (the default): the global model's. A
        strategy that declares ``heterogeneous`` asks such a client to train its own family
        from scratch (``FitIns.config["arch"]``); every other strategy, and every
        evaluation, hands it the global model as before.
    """

    cid: str
    domains: tuple[str, ...]
    tasks: Mapping[str, TaskType]
    num_classes: Mapping[str, int]
    num_train: int
    arch: str | None = None


@dataclass
class FitIns:
    """What the server asks a client to train.

    ``state`` is loaded into the client's model (encoder and/or heads); heads listed in
    ``fresh_heads`` are initialised anew from ``config["seed"]``. ``config`` may hold
    ``epochs``, ``lr``, ``proximal_mu``, ``select_on_val``, ``score_pool`` (return
    :attr:`FitRes.pool_scores`), ``pool_outputs`` (return the trained teacher's
    :attr:`FitRes.pool_outputs` and no weights: ``privacy.transfer: predictions``) and
    ``arch`` (train a fresh model of the client's own encoder family, the one its
    :attr:`ClientInfo.arch` declares, instead of loading ``state``, which is then empty).
    """

    state: State
    fresh_heads: tuple[str, ...] = ()
    config: dict[str, float | int | bool | str] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolOutputs:
    """A teacher's outputs on the server's public pool, computed once at the client (one
    pass, float32, eval mode), in the pool's order: what leaves a client instead of its
    weights when ``privacy.transfer`` is ``predictions``.

    Attributes
    ----------
    features
        ``(pool size, width)`` the encoder's features (the feature-matching targets).
    logits
        Domain -> ``(pool size, num_classes)`` the logits of that domain's head.
    """

    features: torch.Tensor
    logits: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        n = len(self.features)
        tensors = [self.features, *self.logits.values()]
        if self.features.ndim != 2 or any(t.ndim != 2 or len(t) != n for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"pool outputs must be 2-D with one row per pool image, got "
                             f"{shapes}")

    def __len__(self) -> int:
        return len(self.features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name: ``features`` and ``logits.<domain>``."""
        return {"features": self.features,
                **{f"logits.{d}": v for d, v in self.logits.items()}}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (what crosses the boundary, before any framing)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@dataclass
class FitRes:
    """What a client sends back after training: weights and scalar metrics, and, when the
    server asked for them (``config["score_pool"]``), one score per *public* pool image;
    with ``config["pool_outputs"]``, its outputs on the public pool instead of weights;
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
    pool_outputs
        The trained teacher's outputs on the public pool (:class:`PoolOutputs`) when the
        server asked for them (``config["pool_outputs"]``); ``state`` is then empty.
    """

    cid: str
    state: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    pool_scores: torch.Tensor | None = None
    pool_outputs: PoolOutputs | None = None


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
