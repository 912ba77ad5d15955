"""``train.precision=fp16`` on CUDA: float16 autocast with a GradScaler in client training
and in MIM pretraining. Skipped without CUDA (a CPU refuses fp16:
tests/unit/fl/test_client_augment.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig, PretrainConfig, TrainConfig
from engine.nn.precision import grad_scaler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TINY = ModelConfig(arch="vit", hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4)
CUDA = torch.device("cuda")


def test_client_fit_in_fp16_steps_the_scaler(data_root: Path, shard_cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.fl.client as client_module
    from engine.data import ShardBuilder, domain_catalog
    from engine.fl.client import Client, ClientSpec
    from strategies import FitIns

    builder = ShardBuilder(domain_catalog(), data_root, shard_cache, download=False)
    spec = ClientSpec("breast", {"breast": {s: str(p) for s, p in
                                            builder.domain("breast").items()}})
    scalers: list[torch.amp.GradScaler | None] = []

    def recording(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
        scalers.append(grad_scaler(precision, device))
        return scalers[-1]

    monkeypatch.setattr(client_module, "grad_scaler", recording)
    client = Client(spec, TINY, TrainConfig(batch_size=32, precision="fp16",
                                            augment=("flip", "rotate")),
                    max_train_samples=128, max_eval_samples=64, device="cuda")
    seen: list[torch.dtype] = []
    client.model.encoder.vit.blocks[0].mlp.linear1.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype) if m.training else None)
    before = {k: v.clone() for k, v in client._export().items()}
    encoder = {k: v for k, v in before.items() if k.startswith("encoder.")}
    res = client.fit(FitIns(encoder, ("breast",), {"round": 1, "seed": 0}))
    scaler = scalers[-1]
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert set(seen) == {torch.float16}  # the forward pass's linear layers ran in float16
    # the scaler stepped: a finite scale, and at least one step that was not skipped
    assert math.isfinite(scaler.get_scale()) and scaler._get_growth_tracker() >= 1
    assert math.isfinite(res.metrics["train_loss"])
    assert all(torch.isfinite(v).all() and v.dtype == before[k].dtype
               for k, v in res.state.items())
    assert not all(torch.equal(res.state[k], before[k]) for k in encoder)  # it trained


def test_mim_step_in_fp16_with_a_scaler() -> None:
    from engine.train.mim import build_mae, mim_step

    torch.manual_seed(0)
    mae = build_mae(TINY, PretrainConfig()).to(CUDA)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=4)
    scaler = grad_scaler("fp16", CUDA)
    assert scaler is not None
    x = torch.randn(4, 32, 3, 28, 28, device=CUDA)
    losses = [mim_step(mae, x[i], 4, optimizer, scheduler, "fp16", scaler=scaler)
              for i in range(4)]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert scaler._get_growth_tracker() >= 1
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in mae.parameters())


def test_distillation_in_fp16_with_a_scaler() -> None:
    from engine.nn.models import build_model
    from engine.train.distill import DistillJob, check_finite
    from strategies.distill import DistillRequest, DistillSettings, Teacher
    from strategies.state import encoder_of

    teachers = []
    for seed, domain in enumerate(("breast", "pneumonia"), start=1):
        torch.manual_seed(seed)
        net = build_model(TINY, {domain: 2})
        teachers.append(Teacher(cid=domain, domain=domain, task="binary", num_classes=2,
                                state={k: v.detach().clone()
                                       for k, v in net.state_dict().items()}))
    request = DistillRequest(student=encoder_of(teachers[0].state), teachers=teachers,
                             previous={}, heads={t.domain: ("binary", 2) for t in teachers},
                             settings=DistillSettings(steps=10, batch_size=64, eval_every=5))
    job = DistillJob(request, TINY, torch.randn(512, 3, 28, 28), CUDA, precision="fp16")
    assert isinstance(job.scaler, torch.amp.GradScaler) and not job.use_bf16
    curve = job.run()
    assert all(math.isfinite(r["loss"]) for r in curve)
    assert job.scaler._get_growth_tracker() >= 1
    check_finite(job.student_state(), "the fp16 student")
