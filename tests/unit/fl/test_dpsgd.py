"""privacy.dp: Opacus's accountant against the plan, DP-SGD's clipping in a real client fit,
BatchNorm refused, and the round loop's ledger (spent epsilon in the history, rebuilt on
resume, the run stopped before it would exceed its target). No Ray: real clients on a few
real images, driven in-process."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import ModelConfig, TrainConfig, load_config
from engine.config.schema import DPConfig
from engine.fl.client import Client, ClientSpec
from engine.fl.dpsgd import (
    EPSILON_TOLERANCE,
    DPLedger,
    epsilon_of,
    epsilon_of_history,
    fit_config,
    plan_client,
)
from engine.fl.simulation import RunError, Simulation
from engine.nn.models import build_model
from engine.nn.privacy import dp_incompatibility
from engine.records.dp_report import dp_section
from engine.records.history import History
from engine.records.storage import Storage
from strategies import FitIns

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
TINY_KEYS = ["model.hidden_size=32", "model.mlp_dim=64", "model.num_layers=1",
             "model.num_heads=2"]


def test_the_planned_noise_spends_the_target_and_no_more() -> None:
    accountant = "rdp"
    dp = DPConfig(enabled=True, epsilon=3.0, accountant=accountant)
    plan = plan_client(dp, num_train=200, batch_size=20, planned_epochs=6)
    assert plan.sample_rate == 0.1 and plan.steps_per_epoch == 10 and plan.planned_steps == 60
    assert plan.delta == 1 / 2000  # None: 1 / (10 n)
    eps = epsilon_of(plan.noise_multiplier, plan.sample_rate, plan.planned_steps,
                     plan.delta, accountant)
    assert eps == pytest.approx(plan.planned_epsilon)
    assert 3.0 - 0.1 < eps <= 3.0 + EPSILON_TOLERANCE  # on target, not far under it
    # PRV accounting of the same steps is tighter than RDP's, so within the target too
    prv = epsilon_of(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, plan.delta,
                     "prv")
    assert 1.0 < prv <= eps


def test_more_noise_spends_less_epsilon_and_steps_compose() -> None:
    eps = [epsilon_of(sigma, 0.05, 100, 1e-5, "rdp") for sigma in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(eps)), eps
    split = epsilon_of_history([(1.0, 0.05, 40), (1.0, 0.05, 60)], 1e-5, "rdp")
    assert split == pytest.approx(epsilon_of(1.0, 0.05, 100, 1e-5, "rdp"))
    assert epsilon_of(1.0, 0.05, 200, 1e-5, "rdp") > split  # more steps, more epsilon


def test_a_given_noise_too_small_for_the_target_fails_before_training() -> None:
    with pytest.raises(ValueError, match=r"planned DP steps .* spend epsilon=.* > target 1"):
        plan_client(DPConfig(enabled=True, epsilon=1.0, noise_multiplier=0.3), 200, 20, 6)
    ok = plan_client(DPConfig(enabled=True, epsilon=50.0, noise_multiplier=0.8), 200, 20, 6)
    assert ok.noise_multiplier == 0.8 and ok.planned_epsilon < 50


def test_config_ranges_are_checked_at_load() -> None:
    for key, value, match in [("epsilon", "0", "privacy.dp.epsilon must be > 0"),
                              ("delta", "1.5", r"privacy.dp.delta must be in \(0, 1\)"),
                              ("max_grad_norm", "-1", "privacy.dp.max_grad_norm must be > 0"),
                              ("accountant", "gdp", "privacy.dp.accountant"),
                              ("noise_multiplier", "-0.5", "noise_multiplier must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [f"privacy.dp.{key}={value}"])


def test_batchnorm_is_refused_and_the_groupnorm_resnet_trains_under_dp() -> None:
    base = ["privacy.dp.enabled=true", "evaluation.baselines=[fedavg]",
            "pretrain.method=none", "model.arch=resnet18"]
    with pytest.raises(ValueError, match=r"encoder 'resnet18' cannot train under DP-SGD.*"
                                         r"BatchNorm.*model.options.norm=group"):
        load_config(None, base)
    cfg = load_config(None, [*base, "model.options.norm=group"])
    assert dp_incompatibility(cfg.model) is None
    # off, the ResNet is today's BatchNorm network (and DP-off configs load as before)
    plain = load_config(None, ["model.arch=resnet18", "pretrain.method=none"])
    assert any("running_mean" in k for k in build_model(plain.model, {}).state_dict())
    with pytest.raises(ValueError, match="oracle client"):
        load_config(None, ["privacy.dp.enabled=true", "evaluation.baselines=[centralised]"])
    with pytest.raises(ValueError, match=r"train\.grad_clip"):
        load_config(None, ["privacy.dp.enabled=true", "evaluation.baselines=[fedavg]",
                           "train.grad_clip=1.0"])


def _client(spec: ClientSpec, n: int = 40) -> Client:
    train = TrainConfig(batch_size=10, lr=0.5, optimizer="sgd", momentum=0.0,
                        weight_decay=0.0)
    return Client(spec, TINY, train, seed=0, max_train_samples=n, max_eval_samples=16,
                  device="cpu")


def _encoder_change(client: Client, start: dict[str, torch.Tensor],
                    config: Mapping[str, Any]) -> tuple[float, dict]:
    res = client.fit(FitIns(dict(start), config={"epochs": 1, **config}))
    change = math.sqrt(sum(float(((res.state[k] - start[k]) ** 2).sum())
                           for k in start if k.startswith("encoder.")))
    return change, res.metrics


def test_a_dp_fit_clips_every_sample_and_leaves_no_hooks(spec: ClientSpec) -> None:
    client = _client(spec)
    n = len(client.data["breast"]["train"].y)
    start = {k: v.clone() for k, v in client.model.state_dict().items()}
    plain, _ = _encoder_change(client, start, {})
    clip, lr, q = 1e-3, client.train_cfg.lr, 10 / n
    # no noise: the update is lr x (sum of the batch's clipped gradients) / (q n) per step,
    # so its norm over the epoch is at most lr x clip x (images drawn) / (q n) <= steps x
    # lr x clip x n / (q n); unclipped, one epoch moves the encoder far more
    config = {"dp_noise_multiplier": 0.0, "dp_sample_rate": q, "dp_max_grad_norm": clip}
    clipped, metrics = _encoder_change(client, start, config)
    steps = int(1 / q)
    assert metrics["dp_steps"] == steps and metrics["dp_sample_rate"] == q
    assert 0 < clipped <= steps * lr * clip / q * 1.0001
    assert plain > 50 * clipped, (plain, clipped)
    # FedProx's pull is added to the noised gradient (same seed: only it differs)
    assert _encoder_change(client, start, config)[0] == clipped
    assert _encoder_change(client, start, {**config, "proximal_mu": 100.0})[0] != clipped
    # with noise the update differs, and no Opacus attribute or hook stays on the network
    noisy, _ = _encoder_change(client, start, {**config, "dp_noise_multiplier": 1.0})
    assert noisy > 10 * clipped
    assert not any(hasattr(p, "grad_sample") for p in client.model.parameters())
    assert all(not m._forward_hooks for m in client.model.modules())
    again, _ = _encoder_change(client, start, {})  # a plain fit after a DP one is a plain fit
    assert again == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="needs all of"):
        client.fit(FitIns(client.model.state_dict(), config={"dp_sample_rate": q}))


class LocalPool:
    """Real clients in this process (a :class:`~engine.fl.protocols.ClientPool`)."""

    def __init__(self, clients: Mapping[str, Client]) -> None:
        self.clients = dict(clients)
        self.calls: list[str] = []

    def infos(self) -> dict[str, Any]:
        return {cid: c.info() for cid, c in self.clients.items()}

    def run(self, method: str, instructions: Mapping[str, Any], on_done: Any = None,
            on_submitted: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        self.calls += [method] * len(instructions)
        return ({cid: getattr(self.clients[cid], method)(ins)
                 for cid, ins in instructions.items()}, {})


def _sim(tmp_path: Path, pool: LocalPool, *extra: str) -> Simulation:
    cfg = load_config(None, ["data.domains=[breast,pathology]", "strategy.name=fedavg",
                             "strategy.rounds=2", "train.batch_size=10", "train.lr=0.01",
                             "evaluation.baselines=[]", "pretrain.method=none",
                             "run.evaluate_every=0", "privacy.dp.enabled=true",
                             "privacy.dp.epsilon=4", *TINY_KEYS, *extra])
    encoder = {k: v for k, v in next(iter(pool.clients.values())).model.state_dict().items()
               if k.startswith("encoder.")}
    return Simulation(cfg, Storage(tmp_path), pool, encoder, quiet=True)


def test_the_round_loop_accounts_every_client_and_stops_before_exceeding(
        tmp_path: Path, specs: dict[str, ClientSpec]) -> None:
    pool = LocalPool({d: _client(specs[d]) for d in ("breast", "pathology")})
    sim = _sim(tmp_path / "run", pool)
    result = sim.run()
    spent = {(r.round, r.client): r.value for r in result.history.records
             if r.metric == "dp_epsilon"}
    assert set(spent) == {(r, c) for r in (1, 2) for c in ("breast", "pathology")}
    for cid, plan in sim.dp.plans.items():
        assert 0 < spent[(1, cid)] < spent[(2, cid)] <= 4.0 + EPSILON_TOLERANCE
        assert spent[(2, cid)] == pytest.approx(plan.planned_epsilon)  # all planned steps
    section = "\n".join(dp_section([("fedavg", 0, result.history)], {"epsilon": 4.0}))
    for cid in ("breast", "pathology"):
        assert f"| fedavg | 0 | {cid} | {spent[(2, cid)]:.3f} |" in section
    assert f"| {2 * sim.dp.plans['breast'].steps_per_epoch} |" in section
    # resumed from round 1's records, the ledger is the one the run had then
    again = DPLedger(sim.dp.plans)
    again.rebuild(History([r for r in result.history.records if r.round <= 1]).records)
    assert again.epsilon("breast") == pytest.approx(spent[(1, "breast")])
    assert again.steps("breast") == sim.dp.steps("breast") // 2
    # a round beyond the plan is refused before any client trains in it
    fits = pool.calls.count("fit")
    with pytest.raises(RunError, match=r"client .* would spend epsilon=.* > privacy\.dp\.eps"):
        sim._fit_round(3, _NoProgress())
    assert pool.calls.count("fit") == fits
    # a given noise multiplier too small for the target fails before round 1
    with pytest.raises(RunError, match=r"client breast \(\d+ train images\).*planned DP"):
        _sim(tmp_path / "small", pool, "privacy.dp.noise_multiplier=0.2")
    assert pool.calls.count("fit") == fits


def test_the_ledger_flags_a_client_over_its_target() -> None:
    plan = plan_client(DPConfig(enabled=True, epsilon=20.0, noise_multiplier=1.0), 100, 10, 2)
    ledger = DPLedger({"a": plan})
    metrics = {"dp_steps": float(plan.planned_steps), **fit_config(plan)}
    assert ledger.record("a", metrics) == plan.planned_epsilon and not ledger.over_target()
    ledger = DPLedger({"a": dataclasses.replace(plan, target_epsilon=plan.planned_epsilon)})
    ledger.record("a", metrics)
    assert not ledger.over_target()
    ledger.record("a", metrics)  # twice the planned steps
    assert set(ledger.over_target()) == {"a"} and ledger.steps("a") == 2 * plan.planned_steps


class _NoProgress:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None
