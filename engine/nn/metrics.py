"""AUC and ACC exactly as MedMNIST's evaluator computes them.

* binary: AUC of the positive-class score, ACC at threshold 0.5;
* multi-class and ordinal: mean of the one-vs-rest AUCs, ACC at argmax;
* multi-label: mean of the per-label AUCs, ACC of every label at threshold 0.5, averaged.

Scores are probabilities: softmax of the logits, or sigmoid for multi-label. AUC is
computed with MONAI's ``compute_roc_auc``.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import compute_roc_auc

from strategies.types import TaskType


def scores_from_logits(logits: torch.Tensor, task: TaskType) -> torch.Tensor:
    """Probabilities: sigmoid for multi-label, softmax otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if task == "multi-label" else torch.softmax(logits, dim=1)


def _auc(y_true: torch.Tensor, y_score: torch.Tensor) -> float:
    """AUC of one binary problem, NaN when only one class is present."""
    if y_true.numel() == 0 or y_true.min() == y_true.max():
        return math.nan
    return float(compute_roc_auc(y_score.double(), y_true.double()))


def auc_acc(scores: torch.Tensor, labels: torch.Tensor, task: TaskType) -> dict[str, float]:
    """MedMNIST's AUC and ACC.

    Parameters
    ----------
    scores
        ``(N, C)`` probabilities from :func:`scores_from_logits`.
    labels
        ``(N, 1)`` class indices, or ``(N, C)`` 0/1 for multi-label.
    task
        The task type.
    """
    scores = scores.detach().cpu().double()
    labels = labels.detach().cpu().long()
    if task == "multi-label":
        aucs = [_auc(labels[:, i], scores[:, i]) for i in range(labels.shape[1])]
        acc = float(((scores > 0.5).long() == labels).double().mean())
    else:
        y = labels.reshape(-1)
        if task == "binary":
            aucs = [_auc(y, scores[:, -1])]
            acc = float(((scores[:, -1] > 0.5).long() == y).double().mean())
        else:
            aucs = [_auc((y == i).long(), scores[:, i]) for i in range(scores.shape[1])]
            acc = float((scores.argmax(dim=1) == y).double().mean())
    valid = [a for a in aucs if not math.isnan(a)]
    return {"auc": sum(valid) / len(valid) if valid else math.nan, "acc": acc}
