"""The ``flower`` row of ``umim bench crossdevice``: Flower 1.42 ``run_simulation`` on the
bench's export (see :mod:`engine.bench.crossdevice` for the folder's contract).

Usage (a child process, which owns its own Ray): ``python -m engine.bench.crossdevice_flower
'<json job>'``; writes ``result.json`` (times, the partitions trained per round, peak memory
of this process tree) and ``state.pt`` (the final global model) into the job's ``out``.

The ``ClientApp`` is written as Flower's PyTorch quickstart writes one (Message API), kept
faithful to that template as :mod:`engine.bench.flower_tutorial` is:

* for every message it builds a fresh model and loads the received ``ArrayRecord``
  (``to_torch_state_dict``);
* the node's partition comes from ``context.node_config["partition-id"]``; the dataset is
  read once per process and each partition sliced from it, as ``flwr-datasets`` keeps its
  ``FederatedDataset`` per process and ``load_partition`` slices it; a ``TensorDataset`` of
  the partition and a ``DataLoader`` collate the batches, moved to the device batch by
  batch;
* a fresh SGD optimiser per message; the reply is ``ArrayRecord(model.state_dict())`` plus a
  ``MetricRecord`` with ``num-examples``.

For a fair comparison it trains exactly what the engine's client of the same partition
trains: the same tensors (already normalised per client, so the template's per-sample
``ToTensor`` + ``Normalize`` costs nothing here, which favours Flower), model, loss,
optimiser and batches (the ``DataLoader``'s batch sampler is the engine client's
permutation).

The ``ServerApp`` asks every node once for its partition id (a ``query`` message to all
nodes before the first round; it also loads the dataset in each Flower actor, as the engine
loads its shards at start-up; both count as start-up, not as rounds), then runs Flower's
``FedAvg`` whose ``configure_train`` sends, each round, train messages to the nodes of the
partitions the engine samples (``workload.json``'s ``sampled``) instead of Flower's own
random draw; no federated evaluation (``fraction_evaluate=0``). Flower's actors get the
engine's actors' resources: ``client_resources`` of one actor, and a Ray of ``actors`` times
those CPUs, so it runs as many actors as the engine.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

_DATASET: dict[str, Any] = {}
"""This process's copy of the export's training set (the ``FederatedDataset`` of the
template), loaded on first use."""


def load_partition(folder: str, pid: int, threads: int) -> TensorDataset:
    """Partition ``pid`` of the export in ``folder`` (the whole set is read once per
    process; ``threads``: torch's intra-op threads of this process, set then)."""
    if _DATASET.get("folder") != folder:
        torch.set_num_threads(max(1, threads))
        with np.load(Path(folder) / "train.npz") as npz:
            _DATASET.update(folder=folder, x=torch.from_numpy(npz["x"]),
                            y=torch.from_numpy(npz["y"]), offsets=npz["offsets"].tolist())
    lo, hi = _DATASET["offsets"][pid], _DATASET["offsets"][pid + 1]
    return TensorDataset(_DATASET["x"][lo:hi], _DATASET["y"][lo:hi])


def make_client_app(folder: str, meta: dict[str, Any], threads: int) -> ClientApp:
    """The quickstart-style ``ClientApp`` over the export in ``folder``. (The engine's
    helpers are imported where they run, in Flower's actors, so the ServerApp's process
    needs only torch and Flower.)"""
    app = ClientApp()
    domain, cids = meta["domain"], meta["cids"]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        load_partition(folder, pid, threads)
        content = RecordDict({"partition": MetricRecord({"partition-id": pid})})
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from engine.bench.crossdevice import build_network
        from engine.fl.client import derive_seed, epoch_batches, pick_device

        pid = int(context.node_config["partition-id"])
        device = pick_device()
        net = build_network(meta).to(device)
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        dataset = load_partition(folder, pid, threads)
        config: Any = msg.content["config"]
        generator = torch.Generator().manual_seed(
            derive_seed(config["seed"], int(config["server-round"]), cids[pid]))
        optimizer = torch.optim.SGD(net.parameters(), lr=float(meta["lr"]),
                                    momentum=float(meta["momentum"]),
                                    weight_decay=float(meta["weight_decay"]))
        net.train()
        total = 0.0
        for _ in range(int(meta["local_epochs"])):
            batches = [idx.tolist() for idx in
                       epoch_batches(len(dataset), int(meta["batch_size"]), generator)]
            for x, y in DataLoader(dataset, batch_sampler=batches):
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(net(x, domain), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(y)
        n = len(dataset)
        metrics = MetricRecord({"train_loss": total / max(n * int(meta["local_epochs"]), 1),
                                "num-examples": n})
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    return app


class SampledFedAvg(FedAvg):
    """Flower's ``FedAvg`` training, each round, the nodes of the given partitions.

    Parameters
    ----------
    sampled
        Partition ids per round (round ``r`` at ``r - 1``).
    node_of
        Partition id -> node id (learned from the nodes at start-up).
    marks
        Gets ``rounds_start`` (the first ``configure_train``) and ``round_ends``.
    """

    def __init__(self, sampled: list[list[int]], node_of: dict[int, int],
                 marks: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sampled = sampled
        self.node_of = node_of
        self.pid_of = {node: pid for pid, node in node_of.items()}
        self.marks = marks
        self.trained: list[list[int]] = []
        self.errors: list[str] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.marks.setdefault("rounds_start", time.perf_counter())
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN,
                        dst_node_id=self.node_of[pid])
                for pid in self.sampled[server_round - 1]]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.trained.append(sorted(self.pid_of[m.metadata.src_node_id] for m in replies
                                   if not m.has_error()))
        self.errors += [f"round {server_round}: {m.error.reason}" for m in replies
                        if m.has_error()]
        out = super().aggregate_train(server_round, replies)
        self.marks.setdefault("round_ends", []).append(time.perf_counter())
        return out


def main(job: dict[str, Any]) -> None:
    """Run the export's rounds with Flower and save the result (see the module)."""
    from engine.bench.scale import MemoryPeak

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
        from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    folder = job["workload"]
    meta = json.loads((Path(folder) / "workload.json").read_text())
    like = torch.load(Path(folder) / "init.pt", weights_only=True)
    n = len(meta["cids"])
    timeout = float(job["timeout_s"])
    marks: dict[str, Any] = {}
    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        while len(nodes := list(grid.get_node_ids())) < n:
            time.sleep(0.1)
        asked = time.perf_counter()
        queries = [Message(content=RecordDict({"config": ConfigRecord({})}),
                           message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
        node_of: dict[int, int] = {}
        for reply in grid.send_and_receive(queries, timeout=timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not answer the "
                                   f"partition query: {reply.error.reason}")
            pid = int(reply.content["partition"]["partition-id"])
            node_of[pid] = reply.metadata.src_node_id
        if len(node_of) != n:
            raise RuntimeError(f"{len(node_of)} of {n} nodes told their partition")
        marks["query_s"] = time.perf_counter() - asked
        strategy = SampledFedAvg(meta["sampled"], node_of, marks, fraction_train=1.0,
                                 fraction_evaluate=0.0, min_available_nodes=n,
                                 min_train_nodes=0, min_evaluate_nodes=0)
        outcome["result"] = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(like), num_rounds=int(meta["rounds"]),
            timeout=timeout, train_config=ConfigRecord({"seed": int(meta["seed"])}))
        outcome["strategy"] = strategy

    client_app = make_client_app(folder, meta, int(job["threads"]))
    resources = {"num_cpus": job["num_cpus"], "num_gpus": job["num_gpus"]}
    with MemoryPeak() as memory:
        started = time.perf_counter()
        run_simulation(server_app=server, client_app=client_app, num_supernodes=n,
                       backend_config={
                           "client_resources": resources,
                           "init_args": {"address": "local", "include_dashboard": False,
                                         "logging_level": "ERROR",
                                         "num_cpus": job["actors"] * job["num_cpus"],
                                         "num_gpus": job["actors"] * job["num_gpus"]}})
    if "result" not in outcome:
        raise RuntimeError("the Flower ServerApp did not finish (see the log above)")
    strategy: SampledFedAvg = outcome["strategy"]
    state = outcome["result"].arrays.to_torch_state_dict()
    if set(state) != set(like) or any(state[k].shape != like[k].shape for k in state):
        raise RuntimeError(f"Flower returned {len(state)} of {len(like)} arrays: a client "
                           f"failed ({strategy.errors[:3]})")
    out = Path(job["out"])
    torch.save(state, out / "state.pt")
    ends = marks["round_ends"]
    (out / "result.json").write_text(json.dumps({
        "wall_s": ends[-1] - started, "startup_s": marks["rounds_start"] - started,
        "query_s": marks["query_s"], "trained": strategy.trained, "errors": strategy.errors,
        "peak_rss": memory.peak, "peak_pss": memory.peak_pss}))


if __name__ == "__main__":  # import the module by name, so Ray pickles it by reference
    from engine.bench.crossdevice_flower import main as _main

    _main(json.loads(sys.argv[1]))
