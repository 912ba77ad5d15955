"""The membership-inference audit: its metrics on hand-made scores, and the attack on real
images against a model that memorised them and a model that never saw them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, TrainConfig
from engine.fl.audit import (
    METRICS,
    attack_auc,
    attack_metrics,
    balanced_advantage,
    balanced_sample,
    per_sample_loss,
    tpr_at_fpr,
)
from engine.fl.client import Client, ClientSpec, _Split
from engine.fl.relevance import PublicPool
from strategies import FitIns

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)


def test_perfectly_separated_scores_give_auc_one_and_full_tpr() -> None:
    members, nonmembers = np.arange(10, 20.0), np.arange(0, 10.0)
    assert attack_auc(members, nonmembers) == 1.0
    assert tpr_at_fpr(members, nonmembers, 0.01) == 1.0
    assert balanced_advantage(members, nonmembers) == 1.0
    assert attack_auc(nonmembers, members) == 0.0  # reversed: the attack is always wrong


def test_ties_count_half_and_identical_groups_give_chance() -> None:
    same = np.zeros(50)
    assert attack_auc(same, same) == 0.5
    assert tpr_at_fpr(same, same) == 0.0  # flagging anything flags every non-member
    assert balanced_advantage(same, same) == 0.0
    # one member above every non-member, the rest below: AUC = 1/n_members
    assert math.isclose(attack_auc(np.r_[5.0, -np.ones(3)], np.zeros(4)), 0.25)


def test_tpr_at_low_fpr_allows_only_the_flagged_share_of_non_members() -> None:
    nonmembers = np.arange(200.0)  # 1% FPR: at most 2 of the 200 may score above the bar
    members = np.r_[np.full(30, 198.5), np.full(70, -1.0)]  # 30 beat all but 1 non-member
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.3
    assert tpr_at_fpr(members, nonmembers, 0.0) == 0.0  # 199 outscores every member
    assert tpr_at_fpr(members, np.arange(150.0) - 200, 0.0) == 1.0
    m = attack_metrics(members, nonmembers)
    assert m["mia_n"] == 100 and m["mia_tpr_at_1fpr"] == 0.3
    assert math.isclose(m["mia_auc"], 0.3 * 199 / 200)  # the 70 at -1 lose to every one


def test_auc_equals_the_mann_whitney_statistic_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, 60), rng.normal(0, 1, 80).round(1)
    wins = (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()
    assert math.isclose(attack_auc(a, b), wins)
    with pytest.raises(ValueError, match="at least one member"):
        attack_auc(a, b[:0])


def test_balanced_sample_and_per_sample_loss() -> None:
    members, others = balanced_sample(100, 30, 1000, seed=3)
    assert len(members) == len(others) == 30 and len(set(members)) == 30
    assert (members < 100).all() and (others < 30).all()
    assert np.array_equal(balanced_sample(100, 30, 1000, 3)[0], members)  # seeded
    assert len(balanced_sample(100, 300, 20, 3)[1]) == 20
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
    loss = per_sample_loss(logits, torch.tensor([0, 0]), "multi-class")
    assert loss[0] < 0.05 < 4.0 < loss[1]
    multi = per_sample_loss(torch.zeros(3, 5), torch.ones(3, 5), "multi-label")
    assert multi.shape == (3,) and torch.allclose(multi, torch.full((3,), math.log(2)))


def _fit_on(client: Client, x: torch.Tensor, y: torch.Tensor, encoder: dict, epochs: int
            ) -> dict[str, torch.Tensor]:
    """Train ``client``'s model on images ``x`` (its train split swapped for the call)."""
    saved = client.data["pathology"]["train"]
    client.data["pathology"]["train"] = _Split(x, y)
    try:
        return client.fit(FitIns(dict(encoder), ("pathology",),
                                 {"round": 1, "seed": 0, "epochs": epochs})).state
    finally:
        client.data["pathology"]["train"] = saved


def test_a_memorising_model_leaks_and_a_model_that_never_saw_the_images_does_not(
        specs: dict[str, ClientSpec]) -> None:
    # 48 real pathology images (9 classes), 30 epochs: a tiny ViT memorises them
    client = Client(specs["pathology"], TINY, TrainConfig(batch_size=16, lr=1e-2), seed=0,
                    max_train_samples=48, max_eval_samples=48, device="cpu")
    encoder = {k: v.clone() for k, v in client.model.state_dict().items()
               if k.startswith("encoder.")}
    train, val = client.data["pathology"]["train"], client.data["pathology"]["val"]
    overfit = _fit_on(client, train.x, train.y, encoder, epochs=30)  # on the members
    elsewhere = _fit_on(client, val.x, val.y, encoder, epochs=30)  # on other real images
    ins = {"split": "test", "seed": 0}
    leak = client.audit(FitIns(overfit, (), ins)).metrics["pathology"]
    control = client.audit(FitIns(elsewhere, (), ins)).metrics["pathology"]
    assert set(leak) == set(METRICS) and leak["mia_n"] == 48
    assert leak["mia_auc"] > 0.75, leak
    # 48 vs 48 samples: the AUC's sd under no leak is ~0.06; 0.15 is 2.5 of them
    assert abs(control["mia_auc"] - 0.5) < 0.15, control
    assert leak["mia_advantage"] > control["mia_advantage"]
    assert 0.0 <= control["mia_tpr_at_1fpr"] <= leak["mia_tpr_at_1fpr"] <= 1.0
    assert 0.0 <= leak["utility_auc"] <= 1.0
    with pytest.raises(ValueError, match="held-out split"):
        client.audit(FitIns(overfit, (), {"split": "train"}))


def test_a_teacher_that_stays_home_is_attacked_where_it_stayed(
        specs: dict[str, ClientSpec]) -> None:
    client = Client(specs["pathology"], TINY, TrainConfig(batch_size=16), seed=0,
                    max_train_samples=32, max_eval_samples=32, device="cpu")
    val = client.data["pathology"]["val"]  # real images standing in for the public pool
    client.pool = lambda: PublicPool(val.x, *client.norms["pathology"])
    with pytest.raises(ValueError, match="holds no kept teacher"):
        client.audit(FitIns({}, (), {"kept_teacher": True}))
    encoder = {k: v.clone() for k, v in client.model.state_dict().items()
               if k.startswith("encoder.")}
    res = client.fit(FitIns(encoder, ("pathology",), {"round": 1, "epochs": 1,
                                                       "pool_outputs": True,
                                                       "keep_teacher": True}))
    assert res.state == {} and res.pool_outputs is not None  # nothing weight-like left
    kept = client.kept_teacher
    assert kept is not None and set(kept) == set(client.model.state_dict())
    at_home = client.audit(FitIns({}, (), {"kept_teacher": True, "seed": 1}))
    handed = client.audit(FitIns(dict(kept), (), {"seed": 1}))
    assert at_home.metrics == handed.metrics
