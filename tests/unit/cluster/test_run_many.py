"""``clients.dispatch: actor``: an actor's share of a round in one call
(:meth:`engine.cluster.actors.ClientHost.run_many`), Ray-free: the same results as one call
per client, and one client's error is that client's failure while the others still train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.cluster.actors import ClientHost
from engine.config import load_config
from engine.fl.failures import ClientFailure
from engine.run.session import client_specs, initial_encoder
from strategies import create_strategy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_run_many_equals_one_call_per_client_and_isolates_errors(
        data_root: Path, shard_cache: Path) -> None:
    cfg = load_config(None, ["data.domains=[breast]", "data.clients_per_domain=3",
                             "data.max_train_samples=16", "data.max_eval_samples=16",
                             "model.hidden_size=16", "model.mlp_dim=32", "model.num_layers=1",
                             "model.num_heads=2", f"data.data_root={data_root}",
                             f"data.cache_dir={shard_cache}"])
    specs = client_specs(cfg, pooled=False)
    host = ClientHost(specs, cfg.model, cfg.train, cfg.data, seed=0, num_threads=1)
    strategy = create_strategy("fedavg")
    strategy.initialize(host.infos(), initial_encoder(cfg))

    def instructions() -> dict:
        out = strategy.configure_fit(1, sorted(host.clients))
        for ins in out.values():
            ins.config = {**ins.config, "round": 1, "seed": 0}
        return out

    single = {cid: host.fit(cid, {}, ins) for cid, ins in instructions().items()}
    work = instructions()
    bad = sorted(work)[1]
    work[bad].config["lr"] = -1.0  # torch's SGD refuses it: this client raises
    answers = dict(host.run_many("fit", {}, sorted(work.items())))
    assert list(answers) == sorted(work)
    assert isinstance(answers[bad], ClientFailure) and answers[bad].kind == "task_error"
    assert "Invalid learning rate" in answers[bad].message
    for cid, res in answers.items():
        if cid == bad:
            continue
        assert res.state.keys() == single[cid].state.keys()
        for key, value in res.state.items():
            assert torch.equal(value, single[cid].state[key]), (cid, key)
    with pytest.raises(ValueError, match="unknown client method"):
        host.run_many("shutdown", {}, [])


def test_fused_fits_equal_one_by_one_and_unfusable_ones_train_alone(
        data_root: Path, shard_cache: Path) -> None:
    cfg = load_config(None, ["data.domains=[breast]", "data.clients_per_domain=4",
                             "data.partition=dirichlet", "data.max_eval_samples=16",
                             "model.arch=cnn", "model.hidden_size=16", "model.num_heads=2",
                             "train.batch_size=8",
                             "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05",
                             "train.weight_decay=0.0001", "clients.dispatch=actor",
                             "clients.fused_clients=2", f"data.data_root={data_root}",
                             f"data.cache_dir={shard_cache}"])
    specs = client_specs(cfg, pooled=False)
    host = ClientHost(specs, cfg.model, cfg.train, cfg.data, seed=0, num_threads=1,
                      fused_clients=cfg.clients.fused_clients)
    strategy = create_strategy("fedavg")
    strategy.initialize(host.infos(), initial_encoder(cfg))

    def instructions() -> dict:
        out = strategy.configure_fit(1, sorted(host.clients))
        for cid, ins in out.items():
            ins.config = {**ins.config, "round": 1, "seed": 0, "epochs": 2}
            if cid == sorted(out)[-1]:
                ins.config["select_on_val"] = True  # not fusable: trained alone
        return out

    single = {cid: host.fit(cid, {}, ins) for cid, ins in instructions().items()}
    answers = dict(host.run_many("fit", {}, sorted(instructions().items())))
    assert sorted(answers) == sorted(single)
    fused = [c for c, r in answers.items() if r.metrics.get("fused") == 1.0]
    assert fused == sorted(single)[:3]  # two fused steps (chunks of 2 and 1... of 3)
    for cid, res in answers.items():
        assert res.num_examples == single[cid].num_examples
        assert res.metrics["train_loss"] == pytest.approx(single[cid].metrics["train_loss"],
                                                          rel=1e-4)
        for key, value in res.state.items():
            torch.testing.assert_close(value, single[cid].state[key], rtol=1e-5, atol=1e-6)
        if cid in fused:
            assert any(not torch.equal(res.state[k], strategy.encoder[k])
                       for k in strategy.encoder)  # it trained
