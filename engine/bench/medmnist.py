"""``umim bench medmnist``: the MedMNIST v2 recipe, centrally, per dataset, next to the
published numbers.

Each dataset is trained on its own, with labels, the way the MedMNIST v2 benchmark trained
its ResNet-18 (28) row: MONAI ResNet-18 adapted to 28 x 28 (umim's ``model.arch=resnet18``:
3x3 stride-1 stem, no max-pool), Adam at lr 1e-3 (no weight decay), batch 128, the given
epochs with the learning rate x0.1 at 50 % and at 75 % of them (``train.schedule=step``),
the epoch with the best validation AUC kept (``Client.fit``'s ``select_on_val``), and that
model scored on the full official test split. The full train / val / test splits are used
(no caps). Training runs through umim's own plain :class:`~engine.fl.client.Client` in this
process, without Ray, so the numbers check the client, the data plane and the metrics
against the paper.

The published rows are :data:`PUBLISHED` (:data:`CITATION`). ``pathmnist`` is umim's
``pathology`` domain, a subset of PathMNIST (700 train / 200 test images), so its row is
not comparable with the published one on the full dataset.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from engine.config import DataConfig, ModelConfig, TrainConfig
from engine.data import resolve_cache_dir, resolve_data_root
from engine.fl.client import Client, ClientSpec, derive_seed, shard_builder
from engine.nn.models import build_model
from strategies.state import encoder_of
from strategies.types import EvaluateIns, FitIns, State

logger = logging.getLogger(__name__)

DATASETS: dict[str, str] = {"breastmnist": "breast", "pneumoniamnist": "pneumonia",
                            "retinamnist": "retina", "pathmnist": "pathology"}
"""MedMNIST dataset name -> umim domain (``engine/data/domains.yaml``)."""

DEFAULT_DATASETS: tuple[str, ...] = ("breastmnist", "retinamnist")

CITATION = ("MedMNIST v2 (Yang et al., Scientific Data 10:41, 2023), benchmark table, "
            "ResNet-18 (28), test AUC / ACC")
PUBLISHED: dict[str, tuple[float, float]] = {
    "breastmnist": (0.901, 0.863),
    "pneumoniamnist": (0.944, 0.854),
    "retinamnist": (0.717, 0.524),
    "pathmnist": (0.983, 0.907),  # the full PathMNIST; umim's pathology is a subset
}
"""Published test (AUC, ACC) of :data:`CITATION`, per dataset."""

NOT_COMPARABLE: dict[str, str] = {
    "pathmnist": "a PathMNIST subset: not comparable",
}

COLUMNS = ("dataset", "test_auc", "test_acc", "published_auc", "published_acc", "auc_diff",
           "acc_diff", "epochs", "best_epoch", "seconds", "s_per_epoch", "detail")
"""The table's columns (``umim bench medmnist``)."""


def check_datasets(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` lower-cased, or ``ValueError`` (one line) naming the unknown ones and
    listing the valid ones."""
    out = tuple(n.strip().lower() for n in names if n.strip())
    unknown = [n for n in out if n not in DATASETS]
    if unknown or not out:
        what = f"unknown dataset(s) {unknown}" if unknown else "no dataset given"
        raise ValueError(f"{what}; valid: {','.join(DATASETS)}")
    return out


def recipe(epochs: int, batch_size: int = 128, lr: float = 1e-3, precision: str = "auto"
           ) -> tuple[ModelConfig, TrainConfig]:
    """The MedMNIST v2 ResNet-18 (28) recipe as umim's model and training settings."""
    model = ModelConfig(arch="resnet18")
    train = TrainConfig(local_epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam",
                        weight_decay=0.0, schedule="step", milestones=(0.5, 0.75),
                        gamma=0.1, precision=precision)  # type: ignore[arg-type]
    return model, train


def initial_encoder(model: ModelConfig, seed: int) -> State:
    """The random initial encoder of a umim run of ``seed`` (the same weights as
    :func:`engine.run.session.initial_encoder`, without importing Ray)."""
    torch.manual_seed(derive_seed(seed, "initial-encoder"))
    net = build_model(model, {})
    return {k: v.detach().clone() for k, v in encoder_of(net.state_dict()).items()}


def train_one(dataset: str, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
              seed: int = 0, precision: str = "auto", data: DataConfig,
              device: str | None = None) -> dict[str, Any]:
    """Train and score one dataset with the recipe; one table row."""
    domain = DATASETS[dataset]
    paths = shard_builder(data).domain(domain)
    spec = ClientSpec(domain, {domain: {s: str(p) for s, p in paths.items()}})
    model, train = recipe(epochs, batch_size, lr, precision)
    client = Client(spec, model, train, seed=seed, device=device)
    sizes = client.describe()["sizes"][domain]
    logger.info("bench medmnist: %s (%s) %s, %d epochs on %s", dataset, domain, sizes, epochs,
                client.device)
    started = time.perf_counter()
    fit = client.fit(FitIns(initial_encoder(model, seed), (domain,),
                            {"round": 1, "seed": seed, "epochs": epochs,
                             "select_on_val": True}))
    seconds = time.perf_counter() - started
    test = client.evaluate(EvaluateIns(fit.state, "test")).metrics[domain]
    auc, acc = PUBLISHED[dataset]
    detail = NOT_COMPARABLE.get(dataset)
    row = {"dataset": dataset, "domain": domain, "test_auc": test["auc"],
           "test_acc": test["acc"], "published_auc": auc, "published_acc": acc,
           "auc_diff": test["auc"] - auc, "acc_diff": test["acc"] - acc, "epochs": epochs,
           "best_epoch": int(fit.metrics.get("best_epoch", epochs)),
           "val_auc": fit.metrics.get("val_selection_score", math.nan), "seconds": seconds,
           "s_per_epoch": seconds / epochs, "comparable": dataset not in NOT_COMPARABLE,
           "sizes": sizes, "detail": detail}
    logger.info("bench medmnist: %s test AUC %.3f ACC %.3f (published %.3f / %.3f), %.1f s",
                dataset, test["auc"], test["acc"], auc, acc, seconds)
    return row


def bench_medmnist(datasets: Sequence[str] = DEFAULT_DATASETS, *, epochs: int = 100,
                   batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                   precision: str = "auto", data_root: str | None = None,
                   cache_dir: str | None = None, device: str | None = None
                   ) -> dict[str, Any]:
    """Run the MedMNIST v2 ResNet-18 (28) recipe on each dataset, one after another.

    Parameters
    ----------
    datasets
        MedMNIST names (keys of :data:`DATASETS`).
    epochs, batch_size, lr
        The recipe's knobs (MedMNIST v2: 100, 128, 1e-3); the learning rate drops x0.1 at
        50 % and 75 % of ``epochs``.
    seed
        Initial weights and batch order (as a umim run of this seed).
    precision
        ``train.precision`` (``auto``: bf16 autocast on CUDA, float32 on a CPU).
    data_root, cache_dir
        Raw data and shard folders (``None``: ``$UMIM_DATA_ROOT`` / ``$UMIM_CACHE_DIR``,
        else the defaults; see :mod:`engine.data.root`).
    device
        Force a device (default: CUDA if visible, else CPU).

    Returns
    -------
    dict
        ``rows`` (one per dataset, :data:`COLUMNS` and more), ``published`` (the citation)
        and ``workload`` (the recipe).
    """
    names = check_datasets(datasets)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("--epochs and --batch-size must be >= 1 and --lr > 0")
    data = DataConfig(domains=tuple(DATASETS[n] for n in names),
                      data_root=str(resolve_data_root(data_root)),
                      cache_dir=str(resolve_cache_dir(cache_dir)))
    rows = [train_one(n, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      precision=precision, data=data, device=device) for n in names]
    workload = {"model": "MONAI ResNet-18 (28: 3x3 stride-1 stem, no max-pool)",
                "optimizer": f"Adam lr {lr:g}, no weight decay", "batch_size": batch_size,
                "epochs": epochs, "schedule": "x0.1 at 50 % and 75 % of the epochs",
                "selection": "best val AUC epoch", "precision": precision, "seed": seed}
    return {"rows": rows, "published": CITATION, "workload": workload}
