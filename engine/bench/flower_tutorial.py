"""The ``flower`` row of ``umim bench fedavg``: a Flower ``ClientApp`` written the way
Flower's PyTorch quickstart writes one (Flower 1.42 Message API).

What a Flower user would otherwise pick, kept faithful to that template:

* for every message the app builds a fresh model and loads the received arrays into it
  (``ArrayRecord.to_torch_state_dict``);
* the node's partition is read once per process and kept (as ``flwr-datasets`` keeps its
  ``FederatedDataset``), as uint8 images; a ``torch.utils.data.Dataset`` converts and
  normalises each sample when it is drawn (``ToTensor`` + ``Normalize`` in the template) and
  a ``DataLoader`` collates the batches, moved to the device batch by batch;
* a fresh SGD optimiser every round; the reply is ``ArrayRecord(model.state_dict())`` plus a
  ``MetricRecord`` with ``num-examples``.

For a fair comparison it trains exactly what the engine's client of the same id trains: the
same subsample of the partition, the same model, loss, optimiser and seeds, and the same
batches (the ``DataLoader``'s batch sampler is the engine client's permutation), with the
autocast of ``train.precision`` like the engine (:mod:`engine.nn.precision`). It differs in
what the engine does for speed: data and model resident on the device, normalised once,
channels-last.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from engine.bench.fedavg import train_shards
from engine.config import ExperimentConfig
from engine.fl.client import ClientSpec, derive_seed, epoch_batches, pick_device
from engine.nn.models import build_model
from engine.nn.precision import autocast

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp


class PartitionDataset(Dataset):
    """uint8 images converted and normalised one sample at a time, as torchvision's
    ``ToTensor`` + ``Normalize`` would (the same arithmetic as the engine's shards)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        self.images = images
        self.labels = torch.from_numpy(labels.astype(np.int64)).reshape(-1)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.images[i]).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std), self.labels[i]


def make_tutorial_app(cfg: ExperimentConfig, specs: list[ClientSpec], domain: str
                      ) -> ClientApp:
    """The Flower quickstart-style ``ClientApp`` for the bench's clients (``specs``)."""
    partitions: dict[int, PartitionDataset] = {}  # per process, like flwr-datasets' cache
    device = pick_device()

    def load_data(pid: int) -> PartitionDataset:
        if pid not in partitions:
            torch.set_num_threads(max(1, int(cfg.clients.num_cpus)))
            (shard,) = train_shards(cfg, [specs[pid]], domain)
            assert shard.labels is not None
            partitions[pid] = PartitionDataset(shard.images, shard.labels, shard.meta.mean,
                                               shard.meta.std)
        return partitions[pid]

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        cid = specs[pid].cid
        net = build_model(cfg.model, {domain: 2}).to(device)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        dataset = load_data(pid)
        config: Any = msg.content["config"]
        fit_seed = derive_seed(config["seed"], int(config["server-round"]), cid)
        torch.manual_seed(fit_seed)
        generator = torch.Generator().manual_seed(fit_seed)
        optimizer = torch.optim.SGD(net.parameters(), lr=cfg.train.lr,
                                    momentum=cfg.train.momentum,
                                    weight_decay=cfg.train.weight_decay)
        net.train()
        total = 0.0
        for _ in range(cfg.train.local_epochs):
            batches = [idx.tolist() for idx in
                       epoch_batches(len(dataset), cfg.train.batch_size, generator)]
            for x, y in DataLoader(dataset, batch_sampler=batches):
                x, y = x.to(device), y.to(device)
                with autocast(cfg.train.precision, device):
                    logits = net(x, domain)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(y)
        n = len(dataset)
        metrics = MetricRecord({"train_loss": total / max(n * cfg.train.local_epochs, 1),
                                "num-examples": n})
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app
