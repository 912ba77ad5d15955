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

The deployment test runs the app of ``examples/flower-app`` with ``flwr run`` on Flower's
deployment runtime: a ``flower-superlink`` and two ``flower-supernode`` processes on free
localhost ports (insecure), a temporary ``FLWR_HOME`` holding the SuperLink connection.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

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
REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "examples" / "flower-app"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live here
# the deployment run starts one flwr-clientapp process per message (2 nodes x (2 rounds x
# train + evaluate, + a final evaluation)), each importing torch: slow on a loaded machine
DEPLOY_TIMEOUT_S = 420


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
    assert dict(first["client"]) == {"cid": "breast", "domains": ["breast"]}  # who answered
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


# -- Flower's deployment runtime: a SuperLink and two SuperNodes, the app via `flwr run` -----
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


class _Fleet:
    """The processes a test started (with their descendants), each logging to a file."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs[name] = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=self.folder,
                                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return _tail(self.folder / f"{name}.log")

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.procs[name].poll()
            if code is not None:
                pytest.fail(f"{name} exited with code {code}:\n{self.log(name)}")

    def stop(self) -> None:
        """Terminate every process and its descendants (SuperExec, flwr-serverapp,
        flwr-clientapp), then kill what is left after a grace period."""
        import psutil

        victims: list[psutil.Process] = []
        for proc in self.procs.values():
            try:
                top = psutil.Process(proc.pid)
                victims += [*top.children(recursive=True), top]
            except psutil.NoSuchProcess:
                continue
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.terminate()
        _, alive = psutil.wait_procs(victims, timeout=5)
        for victim in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        psutil.wait_procs(alive, timeout=5)
        for log in self.logs.values():
            log.close()


def _wait_for_port(port: int, fleet: _Fleet, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check_alive(name)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    pytest.fail(f"{name} did not listen on port {port} within {timeout:.0f} s:\n"
                f"{fleet.log(name)}")


def test_flower_app_two_rounds_on_the_deployment_runtime(data_root: Path, shard_cache: Path,
                                                          tmp_path: Path) -> None:
    from engine.config import load_config
    from engine.run.session import client_specs, resolve_paths

    overrides = "data.max_train_samples=64 data.max_eval_samples=64"
    experiment = REPO / "experiments" / "smoke.yaml"
    cfg = load_config(experiment, overrides.split())
    assert list(cfg.data.domains) == list(DOMAINS)
    # the shards are built here, once, so the nodes only read them from the shared cache
    client_specs(resolve_paths(cfg, str(data_root), str(shard_cache)), pooled=False)

    link_port = _free_port()
    home = tmp_path / "flwr-home"  # Flower's config and installed apps, never ~/.flwr
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "umim-test"\n\n'
        f'[superlink.umim-test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(FLWR_HOME=str(home), UMIM_DATA_ROOT=str(data_root),
               UMIM_CACHE_DIR=str(shard_cache), OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # SuperExec is found on PATH
    out = tmp_path / "metrics.json"
    fleet = _Fleet(tmp_path, env)
    try:
        fleet.start("superlink", "flower-superlink", "--insecure", "--port", str(link_port),
                    "--disable-runtime-dependency-installation")  # umim is installed here
        for pid in range(len(DOMAINS)):
            fleet.start(f"supernode{pid}", "flower-supernode", "--insecure",
                        "--superlink", f"127.0.0.1:{link_port}", "--port", str(_free_port()),
                        "--node-config", f"partition-id={pid} num-partitions={len(DOMAINS)}")
        _wait_for_port(link_port, fleet, "superlink", timeout=60)
        run = fleet.start(
            "flwr-run", "flwr", "run", str(APP_DIR), "umim-test", "--stream", "--run-config",
            f"experiment='{experiment}' num-server-rounds=2 metrics-out='{out}' "
            f"overrides='{overrides}'")
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while run.poll() is None:  # fail fast if a server or node dies on the way
            fleet.check_alive("superlink", *(f"supernode{p}" for p in range(len(DOMAINS))))
            if time.monotonic() > deadline:
                pytest.fail(f"flwr run did not finish within {DEPLOY_TIMEOUT_S} s:\n"
                            f"{fleet.log('flwr-run')}")
            time.sleep(0.5)
        log = fleet.log("flwr-run")
        assert run.returncode == 0, f"flwr run failed:\n{log}"
        assert out.exists(), f"the ServerApp wrote no metrics:\n{log}"
    finally:
        fleet.stop()

    res = json.loads(out.read_text())
    assert res["rounds"] == 2 and res["experiment"] == str(experiment)
    assert res["clients"] == sorted(DOMAINS), log  # node partition-id -> umim's client
    assert res["shared_keys"] and all(k.startswith("encoder.") for k in res["shared_keys"])
    rows = res["rows"]

    def values(phase: str, metric: str, server_round: int) -> dict[str, float]:
        return {r["cid"]: r["value"] for r in rows if r["phase"] == phase
                and r["metric"] == metric and r["round"] == server_round}

    for r in (1, 2):  # both clients trained and scored the averaged encoder every round
        assert values("train", "num-examples", r) == {d: 64 for d in DOMAINS}
        assert all(math.isfinite(v) for v in values("train", "train_loss", r).values())
        auc = values("evaluate", "auc", r)
        assert set(auc) == set(DOMAINS) and all(0.0 <= v <= 1.0 for v in auc.values()), auc
        assert {x["split"] for x in rows if x["phase"] == "evaluate"} == {"val"}
        # FedAvg's aggregate: the mean weighted by num-examples (64 each: the plain mean)
        agg = res["aggregated"]["evaluate"][str(r)]
        assert agg["auc"] == pytest.approx(sum(auc.values()) / len(auc))
    # the two nodes are different SuperNodes, and the final test scores come back too
    assert len({x["node_id"] for x in rows}) == len(DOMAINS)
    final = values("final", "auc", 2)
    assert set(final) == set(DOMAINS) and all(0.0 <= v <= 1.0 for v in final.values())
    assert {x["split"] for x in rows if x["phase"] == "final"} == {"test"}
    assert "umim: final test metrics" in log and "[ROUND 2/2]" in log


if __name__ == "__main__":
    _simulate(json.loads(sys.argv[1]))
