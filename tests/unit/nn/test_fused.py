"""Fused training of several clients (engine.nn.fused) equals per-client torch.optim runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.fl.client import epoch_batches
from engine.nn.fused import ClientBatches, FusedResult, check_fusable, fused_train
from engine.nn.models import MultiHeadNet, build_model
from engine.nn.precision import autocast
from engine.nn.schedule import build_scheduler, lr_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = (7, 32, 33, 70, 1)
BATCH, EPOCHS = 16, 2


class TinyConv(nn.Module):
    """Two strided convolutions and a linear layer, plus a parameter no forward reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 7 * 7, 16)
        self.unused = nn.Parameter(torch.ones(3))
        self.out_features = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return F.relu(self.fc(x.flatten(1)))


def tiny_conv() -> MultiHeadNet:
    torch.manual_seed(0)
    return MultiHeadNet(TinyConv(), {"d": 6, "e": 3})


def tiny_vit() -> MultiHeadNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="vit", hidden_size=32, mlp_dim=64, num_layers=1,
                                   num_heads=2), {"d": 6, "e": 3})


class Flip:
    """A seeded per-batch augmentation with its own generator (as BatchAugment has)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(len(x), generator=self.generator) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def make_clients(sizes: tuple[int, ...] = SIZES, multilabel: bool = False,
                 augment: bool = False) -> list[ClientBatches]:
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(n, 3, 28, 28, generator=g)
        y = (torch.randint(0, 2, (n, 6), generator=g).float() if multilabel
             else torch.randint(0, 6, (n, 1), generator=g))
        batches = [b for _ in range(EPOCHS) for b in epoch_batches(n, BATCH, g)]
        out.append(ClientBatches(x, y, batches, augment=Flip(i) if augment else None))
    return out


def reference(net: nn.Module, start: dict[str, torch.Tensor], client: ClientBatches, *,
              optimizer: str, lr: float, momentum: float = 0.0, nesterov: bool = False,
              weight_decay: float = 0.0, grad_clip: float | None = None,
              proximal_mu: float = 0.0, multilabel: bool = False,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
              cosine: bool = False) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The engine's per-client loop (Client._train_epoch) on one copy of ``net``."""
    net.load_state_dict(start)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                                     nesterov=nesterov,
                                                     weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = len(client.batches) // EPOCHS
    scheduler = (build_scheduler(opt, "cosine", epochs=EPOCHS, steps_per_epoch=steps,
                                 warmup_epochs=1) if cosine else None)
    anchor = {n: p.detach().clone() for n, p in net.encoder.named_parameters()}
    losses = []
    for idx in client.batches:
        x, y = client.x[idx], client.y[idx]
        if augment is not None:
            x = augment(x)
        logits = net(x, "d").float()
        loss = (F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel
                else F.cross_entropy(logits, y.reshape(-1)))
        if proximal_mu > 0:
            prox = sum(((p - anchor[n]) ** 2).sum() for n, p in net.encoder.named_parameters())
            loss = loss + 0.5 * proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(net.parameters()), grad_clip)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, losses


def assert_matches(result: FusedResult, expected: list[tuple[dict, list[float]]],
                   atol: float = 1e-5) -> None:
    for i, (state, losses) in enumerate(expected):
        for key, value in state.items():
            assert torch.allclose(result.states[i][key], value, atol=atol, rtol=0.0), \
                (i, key, float((result.states[i][key] - value).abs().max()))
        assert torch.allclose(result.step_losses[i], torch.tensor(losses, dtype=torch.float64),
                              atol=1e-5, rtol=1e-5), i


def starts_of(net: MultiHeadNet, k: int) -> list[dict[str, torch.Tensor]]:
    """``k`` different start states of ``net`` (its own, perturbed per client)."""
    base = {n: t.detach().clone() for n, t in net.state_dict().items()}
    out = []
    for i in range(k):
        g = torch.Generator().manual_seed(i)
        out.append({n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()})
    return out


def small_cnn() -> MultiHeadNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="cnn", hidden_size=16, num_heads=2,
                                   options={"channels": (4, 8)}), {"d": 6, "e": 3})


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit, small_cnn], ids=["conv", "vit", "cnn"])
def test_fused_sgd_equals_per_client_sgd(build: Callable[[], MultiHeadNet]) -> None:
    net = build()
    clients = make_clients()
    starts = starts_of(net, len(clients))
    opts: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    result = fused_train(net, "d", starts, clients, optimizer="sgd", **opts)
    expected = [reference(net, s, c, optimizer="sgd", **opts)
                for s, c in zip(starts, clients, strict=True)]
    assert_matches(result, expected)
    for i, state in enumerate(result.states):  # the untrained tensors are the start's
        for key in ("heads.e.weight", "encoder.unused"):
            if key in state:
                assert torch.equal(state[key], starts[i][key])
        assert not torch.equal(state["heads.d.weight"], starts[i]["heads.d.weight"])
    last = len(epoch_batches(SIZES[3], BATCH, torch.Generator()))
    losses = expected[3][1][-last:]
    sizes = [len(b) for b in clients[3].batches[-last:]]
    assert result.train_loss(3, last=last) == pytest.approx(
        sum(v * n for v, n in zip(losses, sizes, strict=True)) / SIZES[3], rel=1e-5)


@pytest.mark.parametrize("opts", [
    {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3,
     "grad_clip": 0.5},
    {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3, "proximal_mu": 0.1},
    {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0},
    {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "cosine": True},
], ids=["sgd-nesterov-clip", "adam-prox", "adamw-clip", "sgd-cosine"])
def test_fused_options_equal_per_client(opts: dict[str, Any]) -> None:
    """In float64: Adam's update ``m / sqrt(v)`` turns a rounding difference in a
    near-zero gradient into a visible one (float32 torch.optim itself moves one weight of
    this net by 7e-5 from its float64 run), so float32 would test rounding, not
    semantics."""
    net = tiny_conv().double()
    clients = [ClientBatches(c.x.double(), c.y, c.batches) for c in make_clients()]
    starts = starts_of(net, len(clients))
    fused_opts = {k: v for k, v in opts.items() if k != "cosine"}
    if opts.get("cosine"):  # the schedule of each client's own loop, as per-step rates
        rates = []
        for c in clients:
            factor = lr_factor("cosine", len(c.batches), warmup_steps=len(c.batches) // EPOCHS)
            rates.append([opts["lr"] * factor(t) for t in range(len(c.batches))])
        fused_opts["step_lrs"] = rates
    result = fused_train(net, "d", starts, clients, **fused_opts)
    expected = [reference(net, s, c, **opts) for s, c in zip(starts, clients, strict=True)]
    assert_matches(result, expected, atol=1e-9)


def test_fused_multilabel_augmented_shared_start() -> None:
    net = tiny_conv()
    clients = make_clients(multilabel=True, augment=True)
    start = {n: t.detach().clone() for n, t in net.state_dict().items()}
    result = fused_train(net, "d", start, clients, lr=0.1, momentum=0.9, task="multi-label")
    expected = [reference(net, start, c, optimizer="sgd", lr=0.1, momentum=0.9,
                          multilabel=True, augment=Flip(i)) for i, c in enumerate(clients)]
    assert_matches(result, expected)


def test_bf16_autocast_is_applied_and_close() -> None:
    """bf16: equal to the per-client bf16 run only to bf16 rounding (batched kernels round
    differently), but clearly under autocast (away from the float32 result)."""
    net = tiny_conv()
    clients = make_clients((32, 20))
    start = {n: t.detach().clone() for n, t in net.state_dict().items()}
    bf16 = fused_train(net, "d", start, clients, lr=0.05, momentum=0.9, precision="bf16")
    fp32 = fused_train(net, "d", start, clients, lr=0.05, momentum=0.9)
    for i, c in enumerate(clients):
        net.load_state_dict(start)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for idx in c.batches:
            with autocast("bf16", "cpu"):
                logits = net(c.x[idx], "d")
            opt.zero_grad()
            F.cross_entropy(logits.float(), c.y[idx].reshape(-1)).backward()
            opt.step()
        for key, value in net.state_dict().items():
            assert torch.allclose(bf16.states[i][key], value, atol=1e-2), key
        assert not torch.equal(bf16.states[i]["encoder.fc.weight"],
                               fp32.states[i]["encoder.fc.weight"])


def test_inactive_client_is_untouched() -> None:
    net = tiny_conv()
    clients = make_clients((20, 40))
    idle = ClientBatches(clients[0].x, clients[0].y, batches=[])
    starts = starts_of(net, 3)
    opts: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}
    result = fused_train(net, "d", starts, [clients[0], idle, clients[1]], **opts)
    for key, value in starts[1].items():  # no step, no weight decay, no momentum
        assert torch.equal(result.states[1][key], value), key
    assert len(result.step_losses[1]) == 0 and result.train_loss(1) == 0.0
    alone = fused_train(net, "d", [starts[0], starts[2]], clients, **opts)
    for mine, ref in ((0, 0), (2, 1)):  # the others as if the idle client were not there
        for key, value in alone.states[ref].items():
            assert torch.allclose(result.states[mine][key], value, atol=1e-6), key


def test_refuses_what_it_cannot_fuse() -> None:
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    encoder.out_features = 4 * 26 * 26
    with pytest.raises(ValueError, match="BatchNorm2d"):
        check_fusable(MultiHeadNet(encoder, {"d": 2}))
    with pytest.raises(ValueError, match="dropout"):
        check_fusable(build_model(ModelConfig(arch="vit", hidden_size=32, mlp_dim=64,
                                              num_layers=1, num_heads=2, dropout=0.1),
                                  {"d": 2}))
    with pytest.raises(ValueError, match="optimizer"):
        fused_train(tiny_conv(), "d", tiny_conv().state_dict(), make_clients((4,)), lr=0.1,
                    optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start state"):
        fused_train(tiny_conv(), "d", {"x": torch.zeros(1)}, make_clients((4,)), lr=0.1)
