"""The membership-inference audit, computed at a client on its own data (Ray-free).

A client attacks a model it was handed (its own teacher, the server's global model, a
baseline's model) with the loss-threshold attack (Yeom et al., 2018): a sample's
membership score is the negative of the model's loss on it, so the samples the model fits
unusually well look like training members. Members are the client's train split,
non-members its held-out split (the test split: never trained on and never used to choose
an epoch, unlike val), both a seeded sample of the same size (balanced, at most
:data:`MAX_AUDIT_SAMPLES` each). Only the attack's scalars leave the client: the ROC AUC,
the TPR at 1% FPR, the balanced advantage (``max TPR - FPR``), the sample count, and the
model's utility (AUC) on the held-out split.

The metric functions are pure: they take the two score arrays and return a float.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from engine.nn.metrics import auc_acc, scores_from_logits
from strategies.types import EvaluateRes, FitIns

if TYPE_CHECKING:
    from engine.fl.client import Client

MAX_AUDIT_SAMPLES = 1000
"""Members (and as many non-members) a client attacks per domain at most."""
LOW_FPR = 0.01
"""The false-positive rate the audit reports the attack's TPR at."""
ATTACK = "loss threshold (score: minus the per-sample loss)"
"""The attack the audit runs, as the report names it."""
METRICS = ("mia_auc", "mia_tpr_at_1fpr", "mia_advantage", "mia_n", "utility_auc")
"""The scalars an audit returns per domain."""


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attack's ROC curve (predict "member" when the score is at least a threshold).

    Parameters
    ----------
    members, nonmembers
        Membership scores (higher: more likely a member) of the two groups.

    Returns
    -------
    fpr, tpr
        One point per distinct threshold, from ``(0, 0)`` to ``(1, 1)``; tied scores share
        one point, so the curve's area counts a tie as half a win.

    Raises
    ------
    ValueError
        When either group is empty.
    """
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if not len(members) or not len(nonmembers):
        raise ValueError("a membership attack needs at least one member and one non-member")
    scores = np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last of each tie group
    tps = np.cumsum(labels)[ends]
    fps = ends + 1 - tps
    return np.r_[0.0, fps / len(nonmembers)], np.r_[0.0, tps / len(members)]


def attack_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of the attack: the chance a member outscores a non-member (ties count half);
    0.5 is no leak, 1 a perfect separation."""
    fpr, tpr = roc_curve(members, nonmembers)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = LOW_FPR) -> float:
    """The attack's highest TPR at a threshold whose FPR is at most ``fpr`` (with ``n``
    non-members, at most ``floor(fpr * n)`` of them may be flagged)."""
    f, t = roc_curve(members, nonmembers)
    return float(t[f <= fpr + 1e-12].max())


def balanced_advantage(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The attack's membership advantage at its best threshold: ``max(TPR - FPR)``
    (``2 * balanced accuracy - 1``; 0 is no leak)."""
    f, t = roc_curve(members, nonmembers)
    return float((t - f).max())


def attack_metrics(members: np.ndarray, nonmembers: np.ndarray) -> dict[str, float]:
    """AUC, TPR at :data:`LOW_FPR`, balanced advantage and the member count of an attack
    with these membership scores."""
    return {"mia_auc": attack_auc(members, nonmembers),
            "mia_tpr_at_1fpr": tpr_at_fpr(members, nonmembers, LOW_FPR),
            "mia_advantage": balanced_advantage(members, nonmembers),
            "mia_n": float(len(members))}


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """The training loss of every sample (cross-entropy; multi-label: binary cross-entropy
    averaged over the labels), float32 on the logits' device."""
    if task == "multi-label":
        return F.binary_cross_entropy_with_logits(logits.float(), y.float(),
                                                  reduction="none").mean(dim=1)
    return F.cross_entropy(logits.float(), y.reshape(-1), reduction="none")


def balanced_sample(n_members: int, n_nonmembers: int, cap: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of ``n = min(n_members, n_nonmembers, cap)`` members and as many
    non-members, drawn without replacement with ``seed`` (the same for every model a client
    audits, so their attacks are on the same samples)."""
    n = min(n_members, n_nonmembers, cap)
    rng = np.random.default_rng([seed, 0xA0D1])
    return (np.sort(rng.choice(n_members, n, replace=False)),
            np.sort(rng.choice(n_nonmembers, n, replace=False)))


def audit_model(client: Client, ins: FitIns) -> EvaluateRes:
    """Attack the model of ``ins.state`` on ``client``'s own data; return only scalars.

    ``ins.config``: ``split`` (the non-members, default ``test``; ``val`` for a tuning
    run), ``max_samples`` (default :data:`MAX_AUDIT_SAMPLES`), ``seed`` (of the member
    and non-member samples; with the client id and the domain) and ``kept_teacher``
    (attack the teacher the client kept at home, ``Client.kept_teacher``, instead of
    ``ins.state``: under ``privacy.transfer: predictions`` a fit whose config says
    ``keep_teacher`` keeps it). Per domain the metrics are
    :data:`METRICS`: ``mia_*`` of the loss-threshold attack and ``utility_auc``, the
    model's AUC on the whole non-member split (what :meth:`Client.evaluate` reports).

    Raises
    ------
    ValueError
        For a non-member split other than ``test`` or ``val``, a state that does not fit
        the client's model, or ``kept_teacher`` at a client that kept none.
    """
    from engine.fl.client import derive_seed

    cfg = ins.config
    split = str(cfg.get("split", "test"))
    if split not in ("test", "val"):
        raise ValueError(f"client {client.cid}: the audit's non-members must be a held-out "
                         f"split (test or val), got {split!r}")
    cap = int(cfg.get("max_samples", MAX_AUDIT_SAMPLES))
    seed = int(cfg.get("seed", client.seed))
    state = ins.state
    if cfg.get("kept_teacher", False):
        if client.kept_teacher is None:
            raise ValueError(f"client {client.cid} holds no kept teacher (it returned no "
                             "predictions with keep_teacher since its actor started)")
        state = client.kept_teacher
    client._load(state, (), 0)
    metrics: dict[str, dict[str, float]] = {}
    for domain, splits in client.data.items():
        task = client.tasks[domain]
        inside, outside = client.logits(domain, "train"), client.logits(domain, split)
        y_in, y_out = splits["train"].y, splits[split].y
        utility = auc_acc(scores_from_logits(outside, task), y_out, task)["auc"]
        if not len(y_in) or not len(y_out):
            metrics[domain] = {m: math.nan for m in METRICS}
            continue
        keep_in, keep_out = balanced_sample(len(y_in), len(y_out), cap,
                                            derive_seed(seed, "audit", client.cid, domain))
        loss_in = per_sample_loss(inside, y_in, task).cpu().numpy()[keep_in]
        loss_out = per_sample_loss(outside, y_out, task).cpu().numpy()[keep_out]
        metrics[domain] = {**attack_metrics(-loss_in, -loss_out), "utility_auc": utility}
    n = sum(len(client.data[d][split].y) for d in client.data)
    return EvaluateRes(cid=client.cid, split=split, metrics=metrics, num_examples=n)
