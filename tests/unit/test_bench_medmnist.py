"""``umim bench medmnist``: the MedMNIST v2 recipe runs end to end on the full BreastMNIST
splits (1 epoch here, about 15 s on 2 CPU cores), and its schedule is the paper's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.bench.medmnist import CITATION, DATASETS, PUBLISHED, check_datasets, recipe
from engine.cli import main as cli
from engine.nn.schedule import build_scheduler


def test_recipe_drops_lr_tenfold_at_50_and_75_percent() -> None:
    model, train = recipe(epochs=100)
    assert model.arch == "resnet18"
    assert (train.optimizer, train.lr, train.batch_size, train.weight_decay) == \
        ("adam", 1e-3, 128, 0.0)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(optimizer, train.schedule, epochs=100, steps_per_epoch=5,
                                warmup_epochs=train.warmup_epochs,
                                milestones=train.milestones, gamma=train.gamma)
    assert scheduler is not None
    lrs = []
    for _ in range(100 * 5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    at = {epoch: lrs[epoch * 5] for epoch in (0, 49, 50, 74, 75, 99)}
    assert at == pytest.approx({0: 1e-3, 49: 1e-3, 50: 1e-4, 74: 1e-4, 75: 1e-5, 99: 1e-5})
    assert lrs[50 * 5 - 1] == pytest.approx(1e-3)  # the last step before the milestone


def test_published_numbers_cover_every_dataset() -> None:
    assert set(PUBLISHED) == set(DATASETS) and "Yang et al." in CITATION
    assert PUBLISHED["breastmnist"] == (0.901, 0.863)
    assert DATASETS == {"breastmnist": "breast", "pneumoniamnist": "pneumonia",
                        "retinamnist": "retina", "pathmnist": "pathology"}


def test_unknown_dataset_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "medmnist", "--datasets", "breastmnist,dermamnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dermamnist" in err
    assert "valid: breastmnist,pneumoniamnist,retinamnist,pathmnist" in err
    with pytest.raises(ValueError, match="valid: breastmnist"):
        check_datasets(["chestmnist"])


def test_bench_medmnist_one_epoch_on_breastmnist(data_root: Path, shard_cache: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["bench", "medmnist", "--datasets", "breastmnist", "--epochs", "1", "--json",
                "--data-root", str(data_root), "--cache-dir", str(shard_cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = json.loads("\n".join(lines[max(i for i, x in enumerate(lines) if x == "{"):]))
    assert out["published"] == CITATION and out["workload"]["epochs"] == 1
    [row] = out["rows"]
    assert row["dataset"] == "breastmnist" and row["epochs"] == 1
    assert row["sizes"] == {"train": 546, "val": 78, "test": 156}  # the full splits
    for key in ("test_auc", "test_acc"):
        assert math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0
    assert (row["published_auc"], row["published_acc"]) == (0.901, 0.863)
    assert row["auc_diff"] == pytest.approx(row["test_auc"] - 0.901)
    assert row["acc_diff"] == pytest.approx(row["test_acc"] - 0.863)
    assert row["best_epoch"] == 1 and row["seconds"] > 0
