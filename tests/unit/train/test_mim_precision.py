"""MIM pretraining under autocast (CPU bf16: the CI stand-in for CUDA) and its DDP step count,
without Ray."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig, PretrainConfig
from engine.train.mim import build_mae, mae_to_encoder, mim_step, steps_per_epoch

TINY = ModelConfig(arch="vit", hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)
TINY_MAE = PretrainConfig(decoder_hidden_size=16, decoder_mlp_dim=32, decoder_num_layers=1,
                          decoder_num_heads=2)


def _dtypes(mae: torch.nn.Module) -> list[torch.dtype]:
    """Records the dtype of a linear layer's output in the encoder and in the decoder (a
    block's own output is float32 under autocast: its residual adds promote)."""
    seen: list[torch.dtype] = []
    for block in (mae.blocks[0], mae.decoder_blocks[0]):
        block.mlp.linear1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    return seen


def test_mae_forward_runs_under_cpu_bf16_autocast() -> None:
    torch.manual_seed(0)
    mae = build_mae(TINY, TINY_MAE)
    seen = _dtypes(mae)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # MONAI's index put failed here
        pred, mask = mae(torch.randn(4, 3, 28, 28))
    assert seen == [torch.bfloat16, torch.bfloat16]  # really computed in bf16
    assert pred.shape == (4, 49, 48) and torch.isfinite(pred.float()).all()
    assert mask.sum() > 0


def test_the_fix_keeps_the_state_dict_keys() -> None:
    from monai.networks.nets import MaskedAutoEncoderViT

    mae = build_mae(TINY, TINY_MAE)
    plain = MaskedAutoEncoderViT(in_channels=3, img_size=28, patch_size=4, hidden_size=16,
                                 mlp_dim=32, num_layers=1, num_heads=2,
                                 decoder_hidden_size=16, decoder_mlp_dim=32,
                                 decoder_num_layers=1, decoder_num_heads=2, spatial_dims=2)
    assert list(mae.state_dict()) == list(plain.state_dict())
    assert set(mae_to_encoder(mae.state_dict(), 1)) == set(mae_to_encoder(plain.state_dict(), 1))


def _train(precision: str, steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor],
                                                    list[torch.dtype]]:
    torch.manual_seed(0)
    mae = build_mae(TINY, TINY_MAE)
    seen = _dtypes(mae)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    x = torch.randn(8 * steps, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    losses = [mim_step(mae, x[8 * i:8 * (i + 1)], 4, optimizer, scheduler, precision)
              for i in range(steps)]
    return losses, mae.state_dict(), seen


def test_mim_step_trains_in_bf16_on_cpu() -> None:
    losses, state, seen = _train("bf16")
    assert set(seen) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(losses))) and losses[0] > 0
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_mim_step_auto_on_cpu_is_float32_bit_for_bit() -> None:
    auto, fp32 = _train("auto"), _train("fp32")
    assert set(auto[2]) == {torch.float32}
    assert auto[0] == fp32[0]
    assert all(torch.equal(auto[1][k], fp32[1][k]) for k in auto[1])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("pool", [7, 39, 99, 100, 1001, 1500])
def test_every_rank_runs_the_same_steps(pool: int, world: int) -> None:
    batch = 10
    steps = steps_per_epoch(pool, world, batch)
    shards = [len(range(r, pool, world)) for r in range(world)]
    assert steps >= 1
    # every rank has the full batches of its steps (or, with a shard smaller than one
    # batch, the one short step every rank takes)
    assert all(n // batch >= steps for n in shards) or (min(shards) < batch and steps == 1)
    if world == 1:  # one worker: the step count of before
        assert steps == max(1, pool // batch)


def test_shards_that_differ_by_one_no_longer_differ_in_steps() -> None:
    # 39 images over 2 ranks: shards of 20 and 19, i.e. 2 and 1 full batches of 10
    assert [len(range(r, 39, 2)) // 10 for r in range(2)] == [2, 1]
    assert steps_per_epoch(39, 2, 10) == 1


def test_a_pool_smaller_than_the_workers_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"pretrain\.num_workers"):
        steps_per_epoch(3, 4, 10)
