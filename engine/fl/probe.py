"""Frozen-encoder evaluation at a client: few-shot label subsets, k-NN and the linear probe.

Pure torch functions on tensors a client already holds (its labels, its encoder's features);
:meth:`engine.fl.client.Client.finetune` wires them to the ``mode`` and ``label_fraction``
keys of a request. Nothing here sees a model or a client, and only metrics leave a client.

* :func:`stratified_subset`: the labelled train subset of a few-shot evaluation, fixed by a
  seed and nested across fractions (the 1 % subset lies inside the 10 % subset).
* :func:`knn_scores`: a weighted k-nearest-neighbour vote on L2-normalised features
  (cosine similarity), DINO-style: neighbour weights ``exp(sim / temperature)``, normalised
  so the class scores of a sample are proportions that sum to one.
* :func:`train_linear_head`: a linear head on frozen features, mini-batch AdamW with the
  fixed weight decay :data:`PROBE_WEIGHT_DECAY`, on standardised features, keeping the
  epoch of the best validation score (:func:`selection_score`).

Scores and metrics follow :mod:`engine.nn.metrics` (``ordinal`` is scored as multi-class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config.schema import EVAL_MODES as CONFIG_EVAL_MODES
from engine.nn.metrics import auc_acc, scores_from_logits
from strategies.types import TaskType

EVAL_MODES = CONFIG_EVAL_MODES  # the one list, where the config checks it
"""The values of a fine-tuning request's ``mode`` key (``finetune`` when absent)."""

DEFAULT_K = 11
"""Neighbours of the k-NN vote when the request names no ``k``."""

KNN_TEMPERATURE = 0.07
"""Temperature of the k-NN neighbour weights ``exp(sim / T)`` (DINO's value)."""

KNN_SMOOTHING = 0.01
"""Label smoothing of the k-NN vote before its cross-entropy (the ``loss`` of a k-NN
evaluation), so a confident wrong vote costs a finite ``-log(smoothing / classes)``."""

PROBE_WEIGHT_DECAY = 1e-4
"""AdamW weight decay of the linear probe, fixed (not the fine-tuning ``train.weight_decay``)."""

_STD_FLOOR = 1e-6


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: TaskType) -> torch.Tensor:
    """The training loss of a head, as the client's: BCE for multi-label, else cross-entropy.

    Parameters
    ----------
    logits
        ``(N, C)`` logits.
    labels
        ``(N, 1)`` (or ``(N,)``) class indices, or ``(N, C)`` 0/1 for multi-label.
    task
        The task type.
    """
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels.reshape(-1))


def score_logits(logits: torch.Tensor, labels: torch.Tensor, task: TaskType
                 ) -> dict[str, float]:
    """``auc``, ``acc`` and ``loss`` of logits, as the client scores its model (``loss`` is
    NaN on an empty split)."""
    result = auc_acc(scores_from_logits(logits, task), labels, task)
    result["loss"] = float(task_loss(logits, labels, task)) if len(labels) else math.nan
    return result


def selection_score(metrics: dict[str, float]) -> float:
    """The model-selection score of one domain's validation metrics: AUC, or the negative
    loss when AUC is undefined (the client's rule, for one domain)."""
    return metrics["auc"] if not math.isnan(metrics["auc"]) else -metrics["loss"]


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded, stratified, nested subset of samples: the labelled data of a few-shot run.

    Per class (in ascending class order) one permutation of its samples is drawn from a
    generator seeded with ``seed``, and its first ``ceil(fraction * n_class)`` samples are
    kept: at least one of every class present, and for one ``seed`` the subset of a smaller
    fraction is contained in that of a larger one.

    Parameters
    ----------
    labels
        ``(N,)`` or ``(N, 1)`` class indices; or ``(N, C)`` 0/1 multi-label targets, which
        are stratified on each sample's first positive label (samples with none form a
        stratum of their own).
    fraction
        Share of each class to keep, in ``(0, 1]``.
    seed
        Fixes the subset (derive it from stable parts, e.g. with
        :func:`engine.fl.client.derive_seed`).

    Returns
    -------
    torch.Tensor
        Sorted ``int64`` indices into ``labels`` (on the CPU).

    Raises
    ------
    ValueError
        For a fraction outside ``(0, 1]``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    strata = _strata(labels.detach().cpu())
    generator = torch.Generator().manual_seed(int(seed))
    kept: list[torch.Tensor] = []
    for cls in torch.unique(strata).tolist():
        members = torch.nonzero(strata == cls).reshape(-1)
        order = members[torch.randperm(len(members), generator=generator)]
        # rounded first, so that e.g. 0.07 * 100 keeps 7, not ceil(7.000000000000001) = 8
        take = max(1, math.ceil(round(fraction * len(members), 9)))
        kept.append(order[:take])
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(kept)).values


def _strata(labels: torch.Tensor) -> torch.Tensor:
    """One stratum id per sample: the class index, or a multi-label sample's first positive
    label (``C`` for a sample with none)."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        positive = labels > 0
        first = positive.long().argmax(dim=1)
        return torch.where(positive.any(dim=1), first, torch.full_like(first, labels.shape[1]))
    return labels.reshape(-1).long()


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
               k: int, num_classes: int, task: TaskType, *,
               temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Class scores of a weighted k-NN vote (DINO-style), as probabilities.

    Features are L2-normalised and compared by cosine similarity. Each test sample's ``k``
    most similar train samples vote with weights ``exp(sim / temperature)``, normalised to
    sum to one: a class's score is the weighted share of its neighbours (multi-label: per
    label, the weighted mean of the neighbours' 0/1 labels). The scores go to
    :func:`engine.nn.metrics.auc_acc` as they are.

    Parameters
    ----------
    train_feats, test_feats
        ``(N, D)`` and ``(M, D)`` features.
    train_labels
        ``(N,)`` / ``(N, 1)`` class indices, or ``(N, C)`` 0/1 for multi-label.
    k
        Neighbours; clamped to ``N``.
    num_classes
        ``C``, the width of the scores.
    task
        The task type.
    temperature
        Softness of the neighbour weights (small: the nearest neighbour dominates).
    chunk
        Test samples compared at once (bounds the ``(chunk, N)`` similarity matrix).

    Returns
    -------
    torch.Tensor
        ``(M, C)`` float32 scores in ``[0, 1]``.

    Raises
    ------
    ValueError
        For ``k < 1`` or no train samples.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(train_feats) == 0:
        raise ValueError("k-NN needs at least one labelled train sample")
    k = min(int(k), len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)
    if task == "multi-label":
        targets = train_labels.float().reshape(len(train), num_classes)
    else:
        targets = F.one_hot(train_labels.reshape(-1).long(), num_classes).float()
    out = []
    for i in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[i:i + chunk].float(), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)
        weights = torch.softmax(sims / temperature, dim=1)  # exp(sim / T), normalised
        out.append(torch.einsum("mk,mkc->mc", weights, targets[idx]))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train_feats.device)


def knn_loss(scores: torch.Tensor, labels: torch.Tensor, task: TaskType, *,
             smoothing: float = KNN_SMOOTHING) -> float:
    """Cross-entropy (BCE for multi-label) of a k-NN vote smoothed towards uniform.

    The vote ``p`` becomes ``(1 - smoothing) * p + smoothing / C`` (multi-label: per label,
    towards 1/2), so the loss is finite. NaN on an empty split.
    """
    if len(labels) == 0:
        return math.nan
    scores = scores.float()
    if task == "multi-label":
        p = (1 - smoothing) * scores + smoothing / 2
        return float(F.binary_cross_entropy(p, labels.float()))
    p = (1 - smoothing) * scores + smoothing / scores.shape[1]
    return float(F.nll_loss(p.log(), labels.reshape(-1).long()))


@dataclass(frozen=True)
class LinearHead:
    """A trained linear head on raw (unstandardised) features: ``feats @ weight.T + bias``.

    ``best_epoch`` is the kept epoch (1-based; 0 when no epoch ran) and ``val_score`` its
    :func:`selection_score` (NaN when no epoch ran).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    best_epoch: int
    val_score: float

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)`` of features ``(N, D)``."""
        return feats.float() @ self.weight.T + self.bias


def train_linear_head(train_feats: torch.Tensor, train_labels: torch.Tensor,
                      val_feats: torch.Tensor, val_labels: torch.Tensor, task: TaskType,
                      weight: torch.Tensor, bias: torch.Tensor, *, epochs: int, lr: float,
                      batch_size: int, generator: torch.Generator,
                      weight_decay: float = PROBE_WEIGHT_DECAY,
                      standardize: bool = True) -> LinearHead:
    """Train a linear head on frozen features; keep the epoch of the best validation score.

    Features are standardised with the train features' per-dimension mean and standard
    deviation (a dimension with none is left unscaled); the standardisation is folded into
    the returned head, which therefore applies to raw features. Each epoch visits the train
    features once in mini-batches (order drawn from ``generator``) with AdamW; after it the
    head is scored on the validation features and kept if its :func:`selection_score` beats
    every earlier epoch's.

    Parameters
    ----------
    train_feats, train_labels
        The labelled features ``(N, D)`` and their labels.
    val_feats, val_labels
        The validation features and labels (never subsampled).
    task
        The task type.
    weight, bias
        The initial head ``(C, D)`` and ``(C,)``, acting on standardised features (a fresh
        head's init); not modified.
    epochs
        Passes over the train features (0: the initial head is returned, folded).
    lr
        AdamW learning rate.
    batch_size
        Mini-batch size.
    generator
        Draws the batch order (CPU generator).
    weight_decay
        AdamW weight decay (default :data:`PROBE_WEIGHT_DECAY`).
    standardize
        Standardise the features first (default); ``False`` trains on raw features.

    Returns
    -------
    LinearHead
        The kept head, on raw features.
    """
    x = train_feats.float()
    if standardize and len(x):
        mean = x.mean(dim=0)
        std = x.std(dim=0, unbiased=False)
        std = torch.where(std > _STD_FLOOR, std, torch.ones_like(std))
    else:
        mean = torch.zeros(x.shape[1], device=x.device)
        std = torch.ones(x.shape[1], device=x.device)
    z, z_val = (x - mean) / std, (val_feats.float() - mean) / std
    w = weight.detach().float().to(x.device, copy=True).requires_grad_(True)
    b = bias.detach().float().to(x.device, copy=True).requires_grad_(True)
    best = (w.detach().clone(), b.detach().clone(), 0, math.nan)
    if epochs > 0 and len(z):
        optimizer = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for epoch in range(epochs):
                for idx in torch.randperm(len(z), generator=generator).split(batch_size):
                    idx = idx.to(z.device)
                    loss = task_loss(z[idx] @ w.T + b, train_labels[idx], task)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    score = selection_score(score_logits(z_val @ w.T + b, val_labels, task))
                if best[2] == 0 or score > best[3]:
                    best = (w.detach().clone(), b.detach().clone(), epoch + 1, score)
    w_best, b_best, epoch_best, score_best = best
    folded = w_best / std
    return LinearHead(weight=folded, bias=b_best - folded @ mean, best_epoch=epoch_best,
                      val_score=score_best)
