"""``train.precision`` in the plain client: bf16 on a CPU really runs bf16 autocast (the CI
stand-in for CUDA), ``auto`` on a CPU stays float32 bit for bit."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from engine.config import ModelConfig, TrainConfig
from engine.fl.client import Client, ClientSpec
from strategies import EvaluateIns, FitIns, nonfinite_keys

TINY = ModelConfig(arch="vit", hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)



def _client(spec: ClientSpec, precision: str, model: ModelConfig = TINY, n: int = 64
            ) -> Client:
    return Client(spec, model, TrainConfig(batch_size=16, precision=precision), seed=0,
                  max_train_samples=n, max_eval_samples=n, device="cpu")


def _watch(client: Client, layer: torch.nn.Module | None = None) -> list[torch.dtype]:
    """Output dtypes of one of the encoder's linear (or given) layers, call by call."""
    seen: list[torch.dtype] = []
    layer = layer or client.model.encoder.vit.blocks[0].mlp.linear1
    layer.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    return seen


def _ins(client: Client) -> FitIns:
    encoder = {k: v.clone() for k, v in client._export().items() if k.startswith("encoder.")}
    return FitIns(encoder, ("breast",), {"round": 1, "seed": 3})


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def test_bf16_on_cpu_fits_evaluates_and_finetunes_in_bf16(
        spec: ClientSpec, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        client = _client(spec, "bf16")
    assert client.use_bf16 and client.autocast_dtype == torch.bfloat16
    assert "float32" not in caplog.text  # no silent fallback any more
    seen = _watch(client)
    fit = client.fit(_ins(client))
    assert seen and set(seen) == {torch.bfloat16}
    assert not nonfinite_keys(fit.state) and _finite(fit.metrics)
    assert all(v.dtype == torch.float32 for v in fit.state.values() if v.is_floating_point())
    seen.clear()
    res = client.evaluate(EvaluateIns(fit.state, "val"))
    assert seen and set(seen) == {torch.bfloat16}
    assert _finite(res.metrics["breast"]) and 0 <= res.metrics["breast"]["auc"] <= 1
    seen.clear()
    tuned = client.finetune(_ins(client), "test")
    assert seen and set(seen) == {torch.bfloat16}
    assert _finite(tuned.metrics["breast"]) and tuned.split == "test"


def test_auto_on_cpu_is_float32_bit_for_bit(spec: ClientSpec) -> None:
    auto, fp32 = _client(spec, "auto"), _client(spec, "fp32")
    assert not auto.use_bf16 and auto.autocast_dtype is None
    seen = _watch(auto)
    ins = _ins(auto)  # the same start for both
    ra, rf = auto.fit(ins), fp32.fit(ins)
    assert set(seen) == {torch.float32}
    assert all(torch.equal(ra.state[k], rf.state[k]) for k in ra.state)
    assert ra.metrics["train_loss"] == rf.metrics["train_loss"]
    ea = auto.evaluate(EvaluateIns(ra.state, "test")).metrics
    assert ea == fp32.evaluate(EvaluateIns(rf.state, "test")).metrics


def test_bf16_differs_from_float32(spec: ClientSpec) -> None:
    bf16, fp32 = _client(spec, "bf16"), _client(spec, "fp32")
    ins = _ins(bf16)
    rb, rf = bf16.fit(ins), fp32.fit(ins)
    assert not all(torch.equal(rb.state[k], rf.state[k]) for k in rb.state)


def test_resnet18_fits_in_bf16_on_cpu(spec: ClientSpec) -> None:
    client = _client(spec, "bf16", ModelConfig(arch="resnet18"), n=8)
    seen = _watch(client, client.model.encoder.resnet.conv1)
    res = client.fit(_ins(client))
    assert seen and set(seen) == {torch.bfloat16}
    assert not nonfinite_keys(res.state) and res.metrics["train_loss"] > 0
