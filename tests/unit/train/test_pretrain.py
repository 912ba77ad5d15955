from __future__ import annotations

import torch

from engine.config import ModelConfig, PretrainConfig
from engine.nn.models import build_model
from engine.train.mim import base_fingerprint, build_mae, mae_to_encoder, patchify

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2)


def test_mae_encoder_loads_into_the_vit_encoder_exactly() -> None:
    mae = build_mae(TINY, PretrainConfig())
    encoder = mae_to_encoder(mae.state_dict(), TINY.num_layers)
    model = build_model(TINY, {})
    assert set(encoder) == set(model.state_dict())
    model.load_state_dict(encoder, strict=True)
    torch.testing.assert_close(model.state_dict()["encoder.vit.norm.weight"],
                               mae.state_dict()[f"blocks.{TINY.num_layers}.weight"])


def test_patchify_follows_the_token_order() -> None:
    x = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28)
    patches = patchify(x, 4)
    assert patches.shape == (2, 49, 48)
    # token 8 is grid row 1, column 1: pixels [4:8, 4:8]; channel is the fastest axis
    torch.testing.assert_close(patches[0, 8, :3], x[0, :, 4, 4])
    torch.testing.assert_close(patches[1, 8, 3:6], x[1, :, 4, 5])


def test_base_fingerprint_ignores_workers_but_not_settings(tmp_path) -> None:
    pool = tmp_path / "server-pool-abc" / "pool.parquet"
    a = base_fingerprint(TINY, PretrainConfig(), pool, None, 0)
    assert a == base_fingerprint(TINY, PretrainConfig(num_workers=4), pool, None, 0)
    assert a != base_fingerprint(TINY, PretrainConfig(mask_ratio=0.5), pool, None, 0)
    assert a != base_fingerprint(TINY, PretrainConfig(), pool, 1000, 0)
