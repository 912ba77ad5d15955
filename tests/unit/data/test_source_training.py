"""A client trains and scores on shards of the ``folder`` and ``npz`` sources."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from private_datasets import write_npz

from engine.config import ModelConfig, TrainConfig
from engine.data import ShardBuilder, domain_catalog
from engine.fl.client import Client, ClientSpec
from strategies import EvaluateIns, FitIns

TINY_VIT = ModelConfig(arch="vit", hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def builder(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> ShardBuilder:
    root = tmp_path_factory.mktemp("train-data")
    write_npz(root / "own" / "grades.npz", (64, 64, 3), num_classes=3, counts=(48, 12, 16))
    catalog = domain_catalog({
        "lesions": {"source": "folder", "path": str(image_folder)},
        "grades": {"source": "npz", "path": "own/grades.npz",
                   "label_names": ["none", "mild", "severe"], "task": "ordinal"},
    })
    return ShardBuilder(catalog, root, root / "cache", download=False)


@pytest.mark.parametrize(("domain", "task", "classes", "n_train", "n_test"), [
    ("lesions", "multi-class", 3, 12, 3), ("grades", "ordinal", 3, 48, 16)])
def test_client_fits_and_evaluates_on_a_new_source(builder: ShardBuilder, domain: str,
                                                   task: str, classes: int, n_train: int,
                                                   n_test: int) -> None:
    paths = {s: str(p) for s, p in builder.domain(domain).items()}
    client = Client(ClientSpec(domain, {domain: paths}), TINY_VIT,
                    TrainConfig(batch_size=8, local_epochs=1), seed=0, device="cpu")
    info = client.info()
    assert info.tasks == {domain: task} and info.num_classes == {domain: classes}
    assert info.num_train == n_train
    encoder = {k: v.clone() for k, v in client.model.state_dict().items()
               if k.startswith("encoder.")}
    fit = client.fit(FitIns(encoder, (domain,), {"round": 1, "seed": 0}))
    assert fit.num_examples == n_train and math.isfinite(fit.metrics["train_loss"])
    assert all(torch.isfinite(v).all() for v in fit.state.values() if v.is_floating_point())
    assert any(not torch.equal(fit.state[k], v) for k, v in encoder.items())  # it learned
    res = client.evaluate(EvaluateIns(fit.state, "test"))
    assert res.num_examples == n_test
    metrics = res.metrics[domain]
    assert set(metrics) == {"auc", "acc", "loss"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["acc"] <= 1 and metrics["loss"] > 0
