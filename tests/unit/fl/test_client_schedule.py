"""``train.schedule`` / ``warmup_epochs`` / ``grad_clip`` / ``optimizer=adam`` in the plain
client: the defaults train bit for bit as before, the schedule is stepped per batch over one
fit call, clipping bounds the global gradient norm."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, from_dict
from engine.fl.client import Client, ClientSpec, derive_seed
from strategies import FitIns, nonfinite_keys
from strategies.types import State

TINY = ModelConfig(arch="vit", hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)
N, BATCH = 48, 16  # 3 optimisation steps per epoch



def _client(spec: ClientSpec, **train: object) -> Client:
    cfg = TrainConfig(batch_size=BATCH, **train)  # type: ignore[arg-type]
    return Client(spec, TINY, cfg, seed=0, max_train_samples=N, max_eval_samples=N,
                  device="cpu")


def _ins(client: Client, **config: object) -> FitIns:
    encoder = {k: v.clone() for k, v in client._export().items() if k.startswith("encoder.")}
    return FitIns(encoder, ("breast",), {"round": 1, "seed": 3, **config})


def _legacy_fit(client: Client, ins: FitIns) -> State:
    """``Client.fit`` as it was before schedules (no scheduler, no clipping): the
    reference the defaults must reproduce bit for bit."""
    cfg = ins.config
    fit_seed = derive_seed(cfg.get("seed", client.seed), int(cfg.get("round", 0)), client.cid)
    torch.manual_seed(fit_seed)
    generator = torch.Generator().manual_seed(fit_seed)
    client._load(ins.state, ins.fresh_heads, int(cfg.get("seed", client.seed)))
    epochs = int(cfg.get("epochs", client.train_cfg.local_epochs))
    optimizer = client._optimizer(float(cfg.get("lr", client.train_cfg.lr)))
    for _ in range(epochs):
        client.model.train()
        for domain, idx in client._batches(generator):
            split = client.data[domain]["train"]
            x, y = split.x[idx], split.y[idx]
            loss = client._loss(client.model(x, domain), y, domain)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return client._export()


def _record(client: Client) -> tuple[list[float], list[float]]:
    """Wrap the client's optimisers: (lr, global grad norm) seen by every ``step``."""
    lrs: list[float] = []
    norms: list[float] = []
    build = client._optimizer

    def optimizer(lr: float, dp: object = None) -> torch.optim.Optimizer:
        opt = build(lr, dp)

        def seen(o: torch.optim.Optimizer, args: object, kwargs: object) -> None:
            lrs.append(o.param_groups[0]["lr"])
            grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        opt.register_step_pre_hook(seen)
        return opt

    client._optimizer = optimizer  # type: ignore[method-assign]
    return lrs, norms


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_defaults_train_bit_for_bit_as_before(spec: ClientSpec, optimizer: str) -> None:
    client = _client(spec, optimizer=optimizer, local_epochs=2, precision="fp32")
    ins = _ins(client)
    new = client.fit(ins).state
    old = _legacy_fit(client, ins)
    assert set(new) == set(old)
    assert all(torch.equal(new[k], old[k]) for k in new)


def test_step_schedule_steps_per_batch_over_the_call(spec: ClientSpec) -> None:
    client = _client(spec, optimizer="adam", lr=1e-3, local_epochs=4, schedule="step",
                     milestones=(0.5, 0.75), gamma=0.1)
    lrs, _ = _record(client)
    client.fit(_ins(client))
    assert lrs == pytest.approx([1e-3] * 6 + [1e-4] * 3 + [1e-5] * 3)
    lrs.clear()
    client.fit(_ins(client, epochs=2, lr=1e-2))  # a call's own epochs and lr: its own span
    # 6 steps: x0.1 from step 3 (50 %) and from step 5 (the first at or after 4.5)
    assert lrs == pytest.approx([1e-2] * 3 + [1e-3] * 2 + [1e-4])


def test_warmup_ramps_within_a_one_epoch_fit(spec: ClientSpec) -> None:
    client = _client(spec, lr=0.3, warmup_epochs=1)
    lrs, _ = _record(client)
    client.fit(_ins(client))
    assert lrs == pytest.approx([0.1, 0.2, 0.3])


def test_cosine_decays_after_warmup(spec: ClientSpec) -> None:
    client = _client(spec, lr=1.0, local_epochs=2, schedule="cosine", warmup_epochs=1)
    lrs, _ = _record(client)
    client.fit(_ins(client))
    cosine = [0.5 * (1 + math.cos(math.pi * t / 3)) for t in range(3)]
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, *cosine])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grad_clip_bounds_the_global_norm(spec: ClientSpec, precision: str) -> None:
    client = _client(spec, optimizer="sgd", lr=1e-2, grad_clip=1e-3, precision=precision)
    _, norms = _record(client)
    res = client.fit(_ins(client))
    assert len(norms) == 3 and all(n <= 1e-3 * (1 + 1e-4) for n in norms)
    assert not nonfinite_keys(res.state) and math.isfinite(res.metrics["train_loss"])


def test_adam_is_plain_adam(spec: ClientSpec) -> None:
    client = _client(spec, optimizer="adam", weight_decay=0.0)
    opt = client._optimizer(1e-3)
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize(("override", "match"), [
    ("train.schedule=linear", r"train\.schedule: 'linear' is not one of"),
    ("train.optimizer=rmsprop", r"train\.optimizer: 'rmsprop' is not one of"),
    ("train.milestones=[0.75,0.5]", r"train\.milestones must be strictly increasing"),
    ("train.milestones=[0.5,1.0]", r"train\.milestones must be fractions .* in \(0, 1\)"),
    ("train.gamma=0", r"train\.gamma must be in \(0, 1\]"),
    ("train.gamma=1.5", r"train\.gamma must be in \(0, 1\]"),
    ("train.warmup_epochs=-1", r"train\.warmup_epochs must be >= 0"),
    ("train.grad_clip=0", r"train\.grad_clip must be > 0"),
])
def test_bad_schedule_settings_name_their_key(override: str, match: str) -> None:
    from engine.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_schedule_settings_load() -> None:
    cfg = from_dict(ExperimentConfig, {"train": {
        "optimizer": "adam", "schedule": "step", "warmup_epochs": 2, "milestones": [0.3, 0.6],
        "gamma": 0.5, "grad_clip": 1.0}})
    assert cfg.train.milestones == (0.3, 0.6) and cfg.train.grad_clip == 1.0
    assert TrainConfig(milestones=[0.5]).milestones == (0.5,)  # type: ignore[arg-type]
    defaults = TrainConfig()
    assert (defaults.schedule, defaults.warmup_epochs, defaults.grad_clip) == ("constant", 0,
                                                                               None)
