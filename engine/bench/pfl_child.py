"""Child process of the pfl-research row (:func:`engine.bench.crossdevice_pfl.run_pfl`).

Usage: ``PYTHONPATH=<pfl env> python -m engine.bench.pfl_child '<json job>'`` with the job's
``workload`` (a folder :func:`~engine.bench.crossdevice_pfl.read_workload` accepts), ``out``,
``threads`` and ``launched`` (the parent's ``time.time()`` at launch). Writes ``state.pt``
(the final global model) and ``result.json`` into ``out``. The simulation is written as
pfl's PyTorch image-classification benchmark writes one; :mod:`engine.bench.crossdevice_pfl`
says what it keeps identical to the other rows and what not.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import resource
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class ScheduledUsers:
    """A pfl user sampler (``callable() -> user id``) that replays the workload's schedule:
    its k-th call returns the k-th ``(round, client index)`` of the ``sampled`` lists, read
    round by round; pfl asks once per cohort member, in order."""

    def __init__(self, sampled: list[list[int]]) -> None:
        self._queue = [(r, i) for r, clients in enumerate(sampled, start=1) for i in clients]
        self.served = 0

    def __call__(self) -> tuple[int, int]:
        if self.served == len(self._queue):
            raise RuntimeError(f"pfl asked for user {self.served + 1}; the workload samples "
                               f"{len(self._queue)}")
        self.served += 1
        return self._queue[self.served - 1]


def _no_val_users() -> Any:
    raise RuntimeError("pfl sampled a validation user; the bench gives it none")


def main(job: dict[str, Any]) -> None:
    """Run the workload's rounds with pfl's FedAvg and save the result."""
    torch.set_num_threads(int(job["threads"]))
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.pytorch_ops import get_default_device, to_tensor
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.version import __version__ as pfl_version

    from engine.bench.crossdevice_pfl import read_workload
    from engine.fl.client import derive_seed, epoch_batches

    logging.getLogger("pfl").setLevel(logging.WARNING)
    workload = read_workload(Path(job["workload"]))
    spec, cids, sampled = workload.spec, workload.cids, workload.sampled
    # as pfl's benchmark scripts start (pfl draws its internal seeds from numpy's)
    torch.random.manual_seed(int(spec["seed"]))
    np.random.seed(int(spec["seed"]) % 2**32)
    domain, batch_size = str(spec["domain"]), int(spec["batch_size"])
    x_np, y_np, offsets = workload.arrays()
    # all users' data on pfl's device once (the benchmark's ``numpy_to_tensor=to_tensor``)
    x_all, y_all = to_tensor(torch.from_numpy(x_np)), to_tensor(torch.from_numpy(y_np))

    # the partition ids pfl trains in each of its central iterations (Laps moves it on)
    trained: list[list[int]] = [[]]

    def make_dataset_fn(user: tuple[int, int]) -> Dataset:
        # pfl calls this for the next user of the cohort right before it trains it
        r, i = user
        if r != len(trained):
            raise RuntimeError(f"pfl's central iteration {len(trained)} asked for a user of "
                               f"round {r}: its cohorts and the schedule's rounds differ")
        trained[-1].append(i)
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        seed = derive_seed(spec["seed"], r, cids[i])
        # torch.manual_seed(seed) as the engine's client seeds (without the lazy CUDA
        # seeding torch.manual_seed queues on a CPU-only host, a cost that is not pfl's)
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        order = torch.cat(epoch_batches(hi - lo, batch_size, torch.Generator().manual_seed(seed)))
        order = order.to(x_all.device)
        return Dataset(raw_data=[x_all[lo:hi][order], y_all[lo:hi][order]], user_id=cids[i])

    sampler = ScheduledUsers(sampled)
    training_data = FederatedDataset(make_dataset_fn, sampler)
    val_data = FederatedDataset(make_dataset_fn, _no_val_users)

    net = workload.build_model()

    def loss(self: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             eval: bool = False) -> torch.Tensor:  # pfl's signature
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x, domain).float(), y)

    @torch.no_grad()
    def metrics(self: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                eval: bool = True) -> dict[str, Weighted]:
        self.eval() if eval else self.train()
        logits = self(x, domain).float()
        return {"loss": Weighted(F.cross_entropy(logits, y, reduction="sum").item(), len(y)),
                "accuracy": Weighted((logits.argmax(-1) == y).sum().item(), len(y))}

    net.loss = types.MethodType(loss, net)
    net.metrics = types.MethodType(metrics, net)
    params = [p for p in net.parameters() if p.requires_grad]
    model = PyTorchModel(
        model=net,
        local_optimizer_create=functools.partial(torch.optim.SGD, momentum=spec["momentum"],
                                                 weight_decay=spec["weight_decay"]),
        central_optimizer=torch.optim.SGD(params, lr=1.0))
    buffers = [n for n, b in net.named_buffers() if b.is_floating_point()]
    if buffers:
        logging.warning("pfl federates parameters only; these buffers are not averaged: %s",
                        buffers)

    rounds = len(sampled)
    algorithm_params = NNAlgorithmParams(central_num_iterations=rounds,
                                         evaluation_frequency=rounds,
                                         train_cohort_size=len(sampled[0]),
                                         val_cohort_size=None)
    model_train_params = NNTrainHyperParams(local_learning_rate=float(spec["lr"]),
                                            local_num_epochs=int(spec["local_epochs"]),
                                            local_batch_size=batch_size)
    backend = SimulatedBackend(training_data=training_data, val_data=val_data,
                               postprocessors=[WeightByDatapoints()])
    laps: list[float] = []

    class Laps(TrainingProcessCallback):
        def on_train_begin(self, *, model: Any) -> Metrics:
            laps.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            laps.append(time.perf_counter())
            trained.append([])
            return False, Metrics()

    # a process's first torch.optim optimiser imports torch._dynamo (seconds): start-up,
    # not pfl's rounds
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    startup = time.time() - float(job["launched"])
    started, cpu_started = time.perf_counter(), time.process_time()
    FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                             model_train_params=model_train_params, callbacks=[Laps()])
    rounds_s, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    trained.pop()  # the iteration after the last
    if sampler.served != sum(map(len, sampled)) or len(trained) != len(sampled):
        raise RuntimeError(f"pfl trained {sampler.served} users in {len(trained)} rounds; the "
                           f"workload samples {sum(map(len, sampled))} in {len(sampled)}")
    out = Path(job["out"])
    torch.save({k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
               out / "state.pt")
    device = get_default_device()
    result = {"wall_s": startup + rounds_s, "startup_s": startup, "rounds_s": rounds_s,
              "cpu_s": cpu, "round_s": [b - a for a, b in itertools.pairwise(laps)],
              "trained": trained, "threads": torch.get_num_threads(), "device": str(device),
              "pfl_version": pfl_version,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "unfederated_buffers": buffers}
    if device.type == "cuda":
        result["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
