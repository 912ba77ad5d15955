"""The evaluation modes of ``Client.finetune``: fine-tuning (default, unchanged), the linear
probe and k-NN on frozen features, and few-shot label fractions; plus the pure pieces of
``engine.fl.probe``."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import ModelConfig, TrainConfig
from engine.fl.client import Client, ClientSpec, derive_seed
from engine.fl.probe import (
    EVAL_MODES,
    knn_loss,
    knn_scores,
    stratified_subset,
    train_linear_head,
)
from engine.nn.metrics import auc_acc
from strategies import EvaluateIns, FitIns

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
KEYS = {"auc", "acc", "loss"}



def _client(spec: ClientSpec, n_train: int = 96, **train: object) -> Client:
    return Client(spec, TINY, TrainConfig(batch_size=32, **train), seed=0,
                  max_train_samples=n_train, max_eval_samples=96, device="cpu")


def _encoder(client: Client) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in client.model.state_dict().items() if k.startswith("encoder.")}


def _ins(client: Client, state: dict[str, torch.Tensor] | None = None, **config: object
         ) -> FitIns:
    base: dict = {"epochs": 2, "select_on_val": True, "round": 0, "seed": 3}
    return FitIns(state if state is not None else _encoder(client), tuple(client.data),
                  {**base, **config})


# -- the default stays today's fine-tuning ----------------------------------------------------
def test_default_is_todays_finetuning_bit_for_bit(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"])
    enc = _encoder(c)
    today = c.evaluate(EvaluateIns(c.fit(_ins(c, dict(enc))).state, "test"))
    default = c.finetune(_ins(c, dict(enc)))
    named = c.finetune(_ins(c, dict(enc), mode="finetune"))
    full = c.finetune(_ins(c, dict(enc), mode="finetune", label_fraction=1.0))
    assert default.metrics == today.metrics and set(default.metrics["breast"]) == KEYS
    for res in (named, full):
        m = dict(res.metrics["breast"])
        assert m.pop("n_labelled") == 96.0
        assert m == default.metrics["breast"]  # exact float equality


def test_unknown_mode_and_bad_keys_are_refused(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"])
    with pytest.raises(ValueError, match="linear_probe") as err:
        c.finetune(_ins(c, mode="probe"))
    assert all(m in str(err.value) for m in EVAL_MODES)
    with pytest.raises(ValueError, match="label_fraction"):
        c.finetune(_ins(c, mode="knn", label_fraction=0.0))
    with pytest.raises(ValueError, match="k must"):
        c.finetune(_ins(c, mode="knn", k=0))


def test_no_mode_modifies_the_received_state(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"])
    server = _encoder(c)
    before = {k: v.clone() for k, v in server.items()}
    for config in ({}, {"mode": "linear_probe"}, {"mode": "knn"},
                   {"mode": "finetune", "label_fraction": 0.1}):
        c.finetune(_ins(c, server, **config))
        assert all(torch.equal(server[k], before[k]) for k in before), config


# -- linear probe ---------------------------------------------------------------------------
def test_linear_probe_freezes_the_encoder_and_beats_a_random_head(
        specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["pathology"], n_train=256)
    enc = _encoder(c)
    res = c.finetune(_ins(c, dict(enc), mode="linear_probe", epochs=20, lr=1e-2))
    assert all(torch.equal(c.model.state_dict()[k], v) for k, v in enc.items())
    m = res.metrics["pathology"]
    assert set(m) == KEYS | {"n_labelled"} and m["n_labelled"] == 256.0
    assert res.num_examples == 96 and all(math.isfinite(v) for v in m.values())
    # random heads: the fresh head as fine-tuning starts from, and the untrained probe
    fresh = c.evaluate(EvaluateIns(c._export(), "test")).metrics["pathology"]
    untrained = c.finetune(_ins(c, dict(enc), mode="linear_probe", epochs=0))
    assert m["auc"] > max(fresh["auc"], untrained.metrics["pathology"]["auc"]) + 0.1
    assert m["auc"] > 0.7


def test_linear_head_recovers_a_linear_rule() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) * 5 + 3
    y = (x[:, 0] > 3).long().reshape(-1, 1)
    head = train_linear_head(x[:200], y[:200], x[200:], y[200:], "binary",
                             torch.zeros(2, 8), torch.zeros(2), epochs=30, lr=0.05,
                             batch_size=32, generator=g)
    assert 1 <= head.best_epoch <= 30 and head.val_score > 0.99
    assert auc_acc(torch.softmax(head(x[200:]), 1), y[200:], "binary")["acc"] > 0.95


# -- k-NN -----------------------------------------------------------------------------------
def test_knn_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 16) * 10
    labels = torch.arange(3).repeat(20)
    feats = centres[labels] + torch.randn(60, 16, generator=g)
    test_labels = torch.arange(3).repeat(5)
    test = centres[test_labels] + torch.randn(15, 16, generator=g)
    scores = knn_scores(feats, labels.reshape(-1, 1), test, 11, 3, "multi-class")
    assert torch.allclose(scores.sum(1), torch.ones(15))
    result = auc_acc(scores, test_labels.reshape(-1, 1), "multi-class")
    assert result["auc"] == 1.0 and result["acc"] == 1.0
    assert knn_loss(scores, test_labels, "multi-class") < 0.05
    # k is clamped to the train samples; multi-label votes per label
    multi = torch.stack([labels == 0, labels != 0], 1).long()
    ml = knn_scores(feats, multi, test, 1000, 2, "multi-label")
    truth = torch.stack([test_labels == 0, test_labels != 0], 1).long()
    assert auc_acc(ml, truth, "multi-label")["auc"] == 1.0
    assert math.isfinite(knn_loss(ml, truth, "multi-label"))


def test_knn_on_a_real_shard_random_and_trained_encoder(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["pathology"])
    random_init = _encoder(c)
    trained = {k: v for k, v in c.fit(_ins(c, dict(random_init), epochs=1)).state.items()
               if k.startswith("encoder.")}
    for enc in (random_init, trained):
        res = c.finetune(_ins(c, enc, mode="knn", k=5))
        m = res.metrics["pathology"]
        assert set(m) == KEYS | {"n_labelled"} and m["n_labelled"] == 96.0
        assert all(math.isfinite(v) for v in m.values()) and 0 <= m["auc"] <= 1
    few = c.finetune(_ins(c, random_init, mode="knn", label_fraction=0.01)).metrics
    assert few["pathology"]["n_labelled"] == float(len(c.data["pathology"]["train"].y.unique()))
    assert math.isfinite(few["pathology"]["auc"])  # k clamped to the 9 labelled samples


# -- few-shot subsets -----------------------------------------------------------------------
def test_stratified_subset_is_nested_stratified_sized_and_deterministic() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.zeros(500), torch.ones(300), torch.full((7,), 2.0)]).long()
    labels = labels[torch.randperm(len(labels), generator=g)].reshape(-1, 1)
    subsets = {f: stratified_subset(labels, f, seed=42) for f in (0.01, 0.1, 0.5, 1.0)}
    for f, idx in subsets.items():
        counts = torch.bincount(labels.reshape(-1)[idx], minlength=3)
        assert counts.tolist() == [max(1, math.ceil(f * n)) for n in (500, 300, 7)]
        assert idx.dtype == torch.long and torch.equal(idx, idx.sort().values)
        assert torch.equal(idx, stratified_subset(labels, f, seed=42))
    assert len(subsets[1.0]) == len(labels)
    for small, large in ((0.01, 0.1), (0.1, 0.5), (0.5, 1.0)):
        assert set(subsets[small].tolist()) <= set(subsets[large].tolist())
    assert not torch.equal(subsets[0.1], stratified_subset(labels, 0.1, seed=43))
    # multi-label: strata of the first positive label (none: a stratum of its own)
    multi = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1], [0, 0], [0, 0]])
    assert len(stratified_subset(multi, 0.1, seed=0)) == 3
    with pytest.raises(ValueError, match="label_fraction"):
        stratified_subset(labels, 1.5, seed=0)


def test_few_shot_finetuning_trains_only_on_the_subset(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["pathology"], n_train=200)
    enc = _encoder(c)
    full = c.data["pathology"]["train"]
    seen: list[torch.Tensor] = []
    hook = c.model.encoder.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().clone()) if m.training else None)
    try:
        res = c.finetune(_ins(c, dict(enc), mode="finetune", label_fraction=0.1, epochs=2))
    finally:
        hook.remove()
    n = res.metrics["pathology"]["n_labelled"]
    classes = len(full.y.unique())
    assert 20 <= n <= 20 + classes  # ceil per class: about 10 %
    assert c.data["pathology"]["train"] is full  # restored
    batches = torch.cat(seen)
    assert len(batches) == 2 * n  # two epochs over the subset, nothing else
    flat_full, flat_seen = full.x.reshape(len(full.x), -1), batches.reshape(len(batches), -1)
    used = {int(torch.cdist(row[None], flat_full).argmin()) for row in flat_seen}
    assert len(used) == n
    expect = stratified_subset(full.y, 0.1, seed=derive_seed(3, "labelled", c.cid, "pathology"))
    assert used == set(expect.tolist())
    # the same subset for every mode (and every encoder) of one subset_seed
    knn = c.finetune(_ins(c, dict(enc), mode="knn", label_fraction=0.1))
    assert knn.metrics["pathology"]["n_labelled"] == n
    other = c.finetune(_ins(c, dict(enc), mode="knn", label_fraction=0.1, subset_seed=3,
                              seed=9))
    assert other.metrics["pathology"] == knn.metrics["pathology"]

