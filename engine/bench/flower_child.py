"""Child process of ``umim bench fedavg``: the workload in Flower's ``run_simulation``.

Usage: ``python -m engine.bench.flower_child '<json job>'``; writes ``result.json`` (wall
time) and ``state.pt`` (the final global model) into the job's ``out`` folder. The job's
``style`` picks the ``ClientApp``: ``tutorial`` (written as Flower's PyTorch quickstart
writes one, :mod:`engine.bench.flower_tutorial`) or ``resident`` (Flower driving the engine's
own resident :class:`~engine.fl.client.Client` through :mod:`engine.interop.flower`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def main(job: dict[str, Any]) -> None:
    """Run the FedAvg rounds of ``job["config"]`` with Flower and save the result."""
    from engine.bench.fedavg import DOMAIN, initial_state
    from engine.bench.flower_tutorial import make_tutorial_app
    from engine.config import ExperimentConfig, from_dict
    from engine.fl.client import Client
    from engine.interop.flower import (
        arrays_to_state,
        make_client_app,
        partition_id,
        state_to_arrays,
    )
    from engine.run.session import client_specs

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
        from flwr.app import ConfigRecord, Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg
        from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = from_dict(ExperimentConfig, job["config"])
    specs = client_specs(cfg, pooled=False)
    clients: dict[int, Client] = {}

    def factory(context: Context) -> Client:  # one Client per node and process, kept
        pid = partition_id(context)
        if pid not in clients:
            torch.set_num_threads(max(1, int(cfg.clients.num_cpus)))
            spec = specs[pid].resolve(cfg.data)
            clients[pid] = Client(spec, cfg.model, cfg.train, seed=cfg.seed,
                                  max_train_samples=cfg.data.max_train_samples,
                                  max_eval_samples=cfg.data.max_eval_samples)
        return clients[pid]

    style = job["style"]
    if style == "tutorial":
        client_app = make_tutorial_app(cfg, specs, DOMAIN)
    elif style == "resident":
        client_app = make_client_app(factory)
    else:
        raise ValueError(f"unknown Flower client style {style!r}; use tutorial or resident")
    like = initial_state(cfg)
    initial = state_to_arrays(like)
    results: list[Any] = []
    server = ServerApp()
    n = len(specs)

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                          min_available_nodes=n, min_evaluate_nodes=0)
        results.append(strategy.start(grid=grid, initial_arrays=initial,
                                      num_rounds=cfg.strategy.rounds,
                                      train_config=ConfigRecord({"seed": cfg.seed})))

    # Flower samples clients in its own order; our client ids stay ``pneumonia#<i>``, so each
    # node trains exactly what the engine's client of the same id trains.
    started = time.perf_counter()
    run_simulation(server_app=server, client_app=client_app, num_supernodes=n,
                   backend_config={
                       "client_resources": {"num_cpus": cfg.clients.num_cpus,
                                            "num_gpus": cfg.clients.num_gpus},
                       "init_args": {"address": "local", "include_dashboard": False,
                                     "logging_level": "ERROR"}})
    wall = time.perf_counter() - started
    (result,) = results
    state = arrays_to_state(result.arrays, like)
    if set(state) != set(like):
        raise RuntimeError(f"Flower returned {len(state)} of {len(like)} arrays: a client "
                           "failed (see the log above)")
    out = Path(job["out"])
    torch.save(state, out / "state.pt")
    (out / "result.json").write_text(json.dumps({"wall_s": wall, "domain": DOMAIN}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
