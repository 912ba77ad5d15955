"""Flower interop: our ``Client`` as a Flower ``ClientApp``, driven by Flower's own FedAvg.

The simulation test runs Flower in a child process (this file, run as a script), not in the
pytest process, because Flower's Ray backend is not a good neighbour to other Ray tests:

* it calls ``ray.init`` only when Ray is not initialised, so after another test's
  ``ray.init()`` it would silently run on that cluster (its resources, its runtime env);
* it calls ``ray.shutdown()`` when the simulation ends, tearing down a cluster that a
  module- or session-scoped fixture of another test may still rely on;
* it rewrites ``os.environ["PYTHONPATH"]`` and the ``flwr`` logger's handlers.

A child process isolates all of that both ways (``address="local"`` and an environment
without ``RAY_ADDRESS`` make it start its own Ray even if a cluster is reachable), and its
noisy Flower / Ray output is captured and shown only when the test fails. The price is one
interpreter start (a few seconds) on top of the Ray start that Flower needs anyway.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.integration,
    # importing flwr imports typer, which still uses click APIs that click deprecates
    pytest.mark.filterwarnings("ignore::DeprecationWarning:typer"),
]

DOMAINS = ("breast", "pathology")  # binary and 9-class: different heads, one shared encoder
MODEL = {"hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}
CAPS = {"max_train_samples": 64, "max_eval_samples": 64}
TIMEOUT_S = 300


def _shards(data_root: Path, cache: Path) -> dict[str, dict[str, str]]:
    """domain -> split -> shard path (built once per session in the shared cache)."""
    from engine.data import ShardBuilder, domain_catalog

    builder = ShardBuilder(domain_catalog(), data_root, cache)
    return {d: {s: str(p) for s, p in builder.domain(d).items()} for d in DOMAINS}


def _client(domain: str, paths: dict[str, str]) -> Any:
    from engine.config import ModelConfig, TrainConfig
    from engine.fl.client import Client, ClientSpec

    return Client(ClientSpec(domain, {domain: paths}), ModelConfig(**MODEL),
                  TrainConfig(batch_size=32), seed=0, device="cpu", **CAPS)


# -- in process: the adapter alone (no Ray) -------------------------------------------------
def test_adapter_keeps_heads_in_context_state(data_root: Path, shard_cache: Path) -> None:
    from flwr.app import ConfigRecord, RecordDict

    from engine.interop.flower import HEADS_STATE_KEY, FlowerClient, initial_arrays

    client = _client("breast", _shards(data_root, shard_cache)["breast"])
    sent = initial_arrays(client)
    assert list(sent) == [k for k in client.model.state_dict() if k.startswith("encoder.")]
    node_state = RecordDict()  # what Flower keeps per node as Context.state

    def train(server_round: int) -> RecordDict:
        content = RecordDict({"arrays": sent, "config": ConfigRecord(
            {"server-round": server_round, "seed": 0, "epochs": 1})})
        return FlowerClient(client, node_state).train(content)

    first = train(1)
    assert list(first["arrays"]) == list(sent)  # same keys, same order: encoder only
    assert first["metrics"]["num-examples"] == 64
    head = {k: v.numpy().copy() for k, v in node_state[HEADS_STATE_KEY].items()}
    assert sorted(head) == ["heads.breast.bias", "heads.breast.weight"]
    train(2)  # round 2 starts from the stored (trained) head, not a fresh one
    head2 = node_state[HEADS_STATE_KEY]
    assert any(not (head2[k].numpy() == v).all() for k, v in head.items())

    reply = FlowerClient(client, node_state).evaluate(
        RecordDict({"arrays": first["arrays"], "config": ConfigRecord({"split": "test"})}))
    assert not reply.array_records  # evaluate returns metrics only
    metrics = reply["metrics"]
    assert set(metrics) == {"auc", "acc", "loss", "num-examples"}
    assert metrics["num-examples"] == 64 and 0.0 <= metrics["auc"] <= 1.0

    shared = initial_arrays(client, include_heads=True)  # heads shared too: sent back as well
    both = FlowerClient(client, RecordDict()).train(RecordDict({"arrays": shared}))
    assert list(both["arrays"]) == list(shared)


# -- Flower's own simulation (Ray backend), in a child process ------------------------------
def test_one_fedavg_round_in_flower_simulation(data_root: Path, shard_cache: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    job = {"shards": _shards(data_root, shard_cache), "out": str(out)}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, __file__, json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and out.exists(), f"Flower simulation failed:\n{log}"
    res = json.loads(out.read_text())

    # the server's FedAvg received both clients' encoders and averaged them
    assert res["keys"] == res["initial_keys"] and res["keys"]
    assert all(k.startswith("encoder.") for k in res["keys"])  # heads stayed on the nodes
    assert res["all_finite"], log
    assert res["max_abs_change"] > 0.0, "aggregated arrays equal the initial ones"
    assert sorted(res["train_examples"]) == [64, 64]
    assert math.isfinite(res["train_metrics"]["train_loss"])

    # both clients scored the aggregated encoder with their own head, metrics only
    assert sorted(c["num-examples"] for c in res["eval_clients"]) == [64, 64]
    for c in res["eval_clients"]:
        assert set(c) == {"auc", "acc", "loss", "num-examples"}
        assert 0.0 <= c["auc"] <= 1.0 and 0.0 <= c["acc"] <= 1.0
    assert 0.0 <= res["eval_metrics"]["auc"] <= 1.0


def _simulate(job: dict[str, Any]) -> None:
    """Child process: one FedAvg round of two of our clients in ``run_simulation``."""
    import logging
    import warnings

    import numpy as np
    import torch

    from engine.config import ModelConfig
    from engine.interop.flower import initial_arrays, make_client_app, partition_id
    from engine.nn.models import build_model

    with warnings.catch_warnings():  # flwr imports typer, which uses deprecated click APIs
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
        from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg
        from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
        from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    shards: dict[str, dict[str, str]] = job["shards"]
    domains = list(shards)

    def factory(context: Context) -> Any:
        domain = domains[partition_id(context)]
        return _client(domain, shards[domain])

    torch.manual_seed(0)
    initial = initial_arrays(build_model(ModelConfig(**MODEL), {}))
    seen: dict[str, list[dict[str, float]]] = {"train": [], "evaluate": []}

    def recording(kind: str):  # keep each client's MetricRecord, then average as FedAvg does
        def aggregate(records: list[RecordDict], weight_key: str) -> MetricRecord:
            seen[kind] += [dict(next(iter(r.metric_records.values()))) for r in records]
            return aggregate_metricrecords(records, weight_key)
        return aggregate

    results = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2,
                          train_metrics_aggr_fn=recording("train"),
                          evaluate_metrics_aggr_fn=recording("evaluate"))
        results.append(strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=1, timeout=TIMEOUT_S - 60,
            train_config=ConfigRecord({"seed": 0, "epochs": 1}),
            evaluate_config=ConfigRecord({"split": "val"})))

    run_simulation(
        server_app=server, client_app=make_client_app(factory), num_supernodes=len(domains),
        backend_config={
            # one actor serves both nodes in turn: on a 2-core box a second actor would
            # mostly add a second torch import, not speed
            "client_resources": {"num_cpus": 2, "num_gpus": 0.0},
            "init_args": {"address": "local", "num_cpus": 2, "num_gpus": 0,
                          "include_dashboard": False, "logging_level": "ERROR"},
        })

    (result,) = results
    final: ArrayRecord = result.arrays
    before = {k: v.numpy() for k, v in initial.items()}
    after = {k: v.numpy() for k, v in final.items()}
    Path(job["out"]).write_text(json.dumps({
        "initial_keys": list(before),
        "keys": list(after),
        "all_finite": all(bool(np.isfinite(v).all()) for v in after.values()),
        "max_abs_change": max(float(np.abs(after[k] - before[k]).max()) for k in before
                              if k in after) if set(after) <= set(before) else math.nan,
        "train_examples": [m["num-examples"] for m in seen["train"]],
        "train_metrics": dict(result.train_metrics_clientapp[1]),
        "eval_clients": seen["evaluate"],
        "eval_metrics": dict(result.evaluate_metrics_clientapp[1]),
    }))


if __name__ == "__main__":
    _simulate(json.loads(sys.argv[1]))
