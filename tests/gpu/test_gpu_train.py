"""GPU checks of the server-side jobs in plain torch: MIM under CUDA autocast and the
distillation on CUDA (``precision=auto`` means bf16 there). Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import ModelConfig, PretrainConfig
from engine.nn.models import build_model
from strategies.distill import DistillRequest, DistillSettings, Teacher
from strategies.state import encoder_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SMALL = ModelConfig(arch="vit", hidden_size=192, mlp_dim=384, num_layers=2, num_heads=6)
CUDA = torch.device("cuda")


def _linear_dtypes(block: torch.nn.Module, seen: list[torch.dtype]) -> None:
    block.mlp.linear1.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype) if m.training else None)


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_mim_trains_under_cuda_autocast(precision: str) -> None:
    from engine.train.mim import build_mae, mim_step

    torch.manual_seed(0)
    mae = build_mae(SMALL, PretrainConfig()).to(CUDA)
    seen: list[torch.dtype] = []
    _linear_dtypes(mae.blocks[0], seen)
    _linear_dtypes(mae.decoder_blocks[0], seen)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=3)
    x = torch.randn(3, 64, 3, 28, 28, device=CUDA)
    losses = [mim_step(mae, x[i], 4, optimizer, scheduler, precision) for i in range(3)]
    assert set(seen) == {torch.bfloat16}
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert all(torch.isfinite(p).all() for p in mae.parameters())


def _teacher(domain: str, seed: int) -> Teacher:
    torch.manual_seed(seed)
    net = build_model(SMALL, {domain: 2})
    return Teacher(cid=domain, domain=domain, task="binary", num_classes=2,
                   state={k: v.detach().clone() for k, v in net.state_dict().items()})


def test_distillation_runs_in_bf16_on_cuda() -> None:
    from engine.train.distill import DistillJob, check_finite

    teachers = [_teacher("breast", 1), _teacher("pneumonia", 2)]
    request = DistillRequest(student=encoder_of(teachers[0].state), teachers=teachers,
                             previous={}, heads={t.domain: ("binary", 2) for t in teachers},
                             settings=DistillSettings(steps=20, batch_size=128, eval_every=10))
    pool = torch.randn(1024, 3, 28, 28)
    job = DistillJob(request, SMALL, pool, CUDA)  # precision auto: bf16 on CUDA
    assert job.use_bf16
    seen: list[torch.dtype] = []
    _linear_dtypes(job.module.net.encoder.vit.blocks[0], seen)
    curve = job.run()
    assert set(seen) == {torch.bfloat16}
    assert all(math.isfinite(r["loss"]) and 0 <= r["agreement"] <= 1 for r in curve)
    check_finite(job.student_state(), "the CUDA student")
    fp32 = DistillJob(request, SMALL, pool, CUDA, precision="fp32")
    assert not fp32.use_bf16 and math.isfinite(fp32.step()["loss"])
