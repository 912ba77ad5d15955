"""``umim bench crossdevice`` without Ray: the export the out-of-process rows read, and the
sequential row against the engine's own client and FedAvg (on the real BreastMNIST split
over 4 clients, so it stays small)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bench.crossdevice import (
    CrossDeviceWorkload,
    Exported,
    RowResult,
    build_network,
    check_rows,
    export_workload,
    max_abs_difference,
    read_export,
    run_sequential,
    sampled_clients,
)
from engine.cli import main
from engine.config import ExperimentConfig
from engine.fl.client import Client, ClientSpec
from engine.fl.simulation import make_strategy
from engine.run.session import client_specs, initial_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORKLOAD = CrossDeviceWorkload(clients=4, per_round=2, rounds=2, batch_size=16, lr=0.05,
                               samples_per_client=40)


@pytest.fixture(scope="module")
def cfg(data_root: Path, shard_cache: Path) -> ExperimentConfig:
    return WORKLOAD.experiment({"domains": ["breast"], "data_root": str(data_root),
                                "cache_dir": str(shard_cache), "download": False})


@pytest.fixture(scope="module")
def specs(cfg: ExperimentConfig) -> list[ClientSpec]:
    return client_specs(cfg, pooled=False)


@pytest.fixture(scope="module")
def exported(cfg: ExperimentConfig, specs: list[ClientSpec],
             tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return export_workload(cfg, specs, tmp_path_factory.mktemp("export"))


def test_the_export_holds_what_every_engine_client_trains(
        cfg: ExperimentConfig, specs: list[ClientSpec], exported: Exported) -> None:
    meta = json.loads((exported.folder / "workload.json").read_text())
    assert set(meta) == {"cids", "domain", "num_classes", "rounds", "batch_size", "lr",
                         "momentum", "weight_decay", "local_epochs", "seed", "sampled",
                         "model", "threads"}
    assert meta["cids"] == sorted(s.cid for s in specs) and meta["domain"] == "breast"
    assert (meta["num_classes"], meta["rounds"], meta["batch_size"]) == (2, 2, 16)
    # round r's sample: the engine's seeded sampling, as partition ids (ascending)
    index = {c: i for i, c in enumerate(meta["cids"])}
    assert meta["sampled"] == [[index[c] for c in r] for r in sampled_clients(cfg,
                                                                            meta["cids"])]
    assert all(len(r) == 2 and r == sorted(r) for r in meta["sampled"])
    with np.load(exported.folder / "train.npz") as npz:
        x, y, offsets = npz["x"], npz["y"], npz["offsets"]
    assert x.dtype == np.float32 and x.shape[1:] == (3, 28, 28)
    assert y.dtype == np.int64 and y.shape == (len(x),) and offsets.dtype == np.int64
    assert offsets[0] == 0 and offsets[-1] == len(x) and len(offsets) == len(specs) + 1
    by_cid = {s.cid: s for s in specs}
    for i, cid in enumerate(meta["cids"]):  # exactly the engine client's train tensors
        client = Client(by_cid[cid].resolve(cfg.data), cfg.model, cfg.train, seed=cfg.seed,
                        max_train_samples=cfg.data.max_train_samples, device="cpu")
        train = client.data["breast"]["train"]
        assert torch.equal(torch.from_numpy(x[offsets[i]:offsets[i + 1]]), train.x)
        assert torch.equal(torch.from_numpy(y[offsets[i]:offsets[i + 1]]), train.y.reshape(-1))
    assert np.diff(offsets).tolist() == [40] * 4  # the seeded cap
    # the network and the initial state rebuild from the files alone
    net = build_network(meta)
    net.load_state_dict(torch.load(exported.folder / "init.pt", weights_only=True))
    assert set(net.state_dict()) == set(exported.init)
    assert {k for k in exported.init if k.startswith("encoder.")} == set(initial_encoder(cfg))
    back = read_export(exported.folder)
    assert back.cids == exported.cids and torch.equal(back.x, exported.x)


def test_the_sequential_row_is_the_engine_clients_fedavg(
        cfg: ExperimentConfig, specs: list[ClientSpec], exported: Exported) -> None:
    row = run_sequential(exported)
    assert row.trained == exported.sampled and row.wall_s > 0 and row.peak_rss
    # the engine's way: its Client.fit on each sampled client, its FedAvg aggregation
    clients = {s.cid: Client(s.resolve(cfg.data), cfg.model, cfg.train, seed=cfg.seed,
                             max_train_samples=cfg.data.max_train_samples, device="cpu")
               for s in specs}
    strategy = make_strategy(cfg)
    strategy.initialize([c.info() for c in clients.values()], initial_encoder(cfg))
    for server_round, cids in enumerate(sampled_clients(cfg, sorted(clients)), start=1):
        results = {}
        for cid, ins in strategy.configure_fit(server_round, cids).items():
            ins.config = {**ins.config, "round": server_round, "seed": cfg.seed}
            results[cid] = clients[cid].fit(ins)
        strategy.aggregate_fit(server_round, results, {})
    engine = strategy.client_state(sorted(clients)[0])
    assert row.state is not None and max_abs_difference(row.state, engine) <= 1e-6
    assert max_abs_difference(row.state, exported.init) > 1e-3  # it did train


def test_the_check_fails_on_other_clients_or_other_weights() -> None:
    state = {"w": torch.zeros(3)}
    sampled = [[0, 1], [1, 2]]
    rows = [RowResult("sequential", wall_s=1.0, state=state, trained=sampled),
            RowResult("umim", wall_s=2.0, startup_s=0.5, state={"w": torch.full((3,), 1e-7)},
                      trained=sampled),
            RowResult("flower", wall_s=3.0, state={"w": torch.tensor([0.0, 0.1, 0.0])},
                      trained=[[0, 1], [1, 3]]),
            RowResult("pfl", status="not run: no pfl here")]
    scores = {"sequential": 0.9, "umim": 0.9, "flower": 0.8}
    diffs, failures = check_rows(rows, sampled, scores, 0.005, 1e-4)
    assert diffs["umim"] == pytest.approx(1e-7) and diffs["flower"] == pytest.approx(0.1)
    assert failures == [
        "flower trained other clients than the sampled ones (round 2)",
        "flower's final weights differ from sequential's by 0.1 > 0.0001",
        "flower's test accuracy 0.8000 differs from sequential's 0.9000 by more than 0.005"]
    assert max_abs_difference(state, {"v": torch.zeros(3)}) == float("inf")


@pytest.mark.parametrize(("argv", "message"), [
    (["--clients", "4", "--per-round", "5"], "per-round (5) cannot exceed clients (4)"),
    (["--rows", "sequential,nope"], "--rows: unknown or repeated row(s) ['nope']"),
    (["--lr", "0"], "lr and alpha must be > 0"),
])
def test_bad_flags_are_one_line_usage_errors(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "crossdevice", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("umim bench crossdevice: error:")
    assert message in err


def test_a_failed_comparison_exits_1_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import engine.bench.crossdevice as bench

    def disagreeing(workload: CrossDeviceWorkload, **_: object) -> dict:
        assert (workload.clients, workload.per_round) == (10, 2)
        return {"rows": [{"method": "sequential", "result": "ok", "wall_s": 1.0},
                         {"method": "pfl", "result": "not run", "reason": "no pfl here"}],
                "passed": False, "failures": ["umim trained other clients (round 1)"],
                "updates": 2, "acc_tolerance": 0.005, "state_tolerance": 1e-4, "sampled": [],
                "data": {}, "workload": {}}

    monkeypatch.setattr(bench, "bench_crossdevice", disagreeing)
    assert main(["bench", "crossdevice", "--clients", "10", "--per-round", "2"]) == 1
    out, err = capsys.readouterr()
    assert "pfl not run: no pfl here" in out and "comparison: FAILED" in out
    assert err.strip() == ("umim bench crossdevice: the rows disagree: umim trained other "
                           "clients (round 1)")
