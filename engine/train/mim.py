"""Masked image modelling on the server's unlabelled pool: the base encoder.

MONAI's ``MaskedAutoEncoderViT`` is trained on Ray Train (DDP) with the encoder sizes of
``model``; its encoder weights are then renamed into the keys of the umim ViT encoder. A
base is cached under ``<cache_dir>/bases/<fingerprint>/`` and reused by every experiment
with the same settings and pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import DataConfig, ModelConfig, PretrainConfig, TrainScaling, to_dict
from engine.data.shards import read_shard
from engine.data.unify import UNIFIED_CHANNELS, UNIFIED_SIZE
from engine.records.storage import write_atomic
from engine.train.launch import fit_trainer, load_checkpoint_state, report, unwrap
from strategies.state import encoder_key

logger = logging.getLogger(__name__)
CURVE_KEY = "_curve"


def build_mae(model: ModelConfig, pretrain: PretrainConfig) -> torch.nn.Module:
    """MONAI ``MaskedAutoEncoderViT`` whose encoder matches :class:`engine.nn.models.ViTEncoder`."""
    from monai.networks.nets import MaskedAutoEncoderViT

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        return MaskedAutoEncoderViT(
            in_channels=UNIFIED_CHANNELS, img_size=UNIFIED_SIZE, patch_size=model.patch_size,
            hidden_size=model.hidden_size, mlp_dim=model.mlp_dim, num_layers=model.num_layers,
            num_heads=model.num_heads, masking_ratio=pretrain.mask_ratio,
            decoder_hidden_size=pretrain.decoder_hidden_size,
            decoder_mlp_dim=pretrain.decoder_mlp_dim,
            decoder_num_layers=pretrain.decoder_num_layers,
            decoder_num_heads=pretrain.decoder_num_heads, pos_embed_type="sincos",
            decoder_pos_embed_type="sincos", dropout_rate=model.dropout, spatial_dims=2)


def mae_to_encoder(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename an MAE state into the umim encoder's keys (``encoder.vit.*``).

    The MAE keeps its final LayerNorm as ``blocks.<num_layers>``; the ViT calls it ``norm``.
    The decoder, mask token and class token are dropped.
    """
    out = {}
    for key, value in state.items():
        if key.startswith(f"blocks.{num_layers}."):
            key = "norm." + key.split(".", 2)[2]
        elif not key.startswith(("patch_embedding.", "blocks.")):
            continue
        out[encoder_key(f"vit.{key}")] = value.detach().clone()
    return out


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, patch * patch * C)`` in the MAE's token order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def load_pool(data: DataConfig) -> torch.Tensor:
    """The server pool's normalised images (a seeded subsample when ``data.pool_size`` is set).

    The pool shard is found (or built) on the node this runs on.
    """
    from engine.fl.client import shard_builder

    shard = read_shard(shard_builder(data).pool())
    pool_size, seed = data.pool_size, data.mednist_seed
    if pool_size is not None and len(shard) > pool_size:
        rng = np.random.default_rng(seed)
        shard = shard.subset(np.sort(rng.choice(len(shard), pool_size, replace=False)))
    x, _ = shard.tensors()
    return x


def mim_loop(config: dict[str, Any]) -> None:
    """Per-worker MAE training (Ray Train)."""
    import ray.train
    import ray.train.torch

    model_cfg: ModelConfig = config["model"]
    cfg: PretrainConfig = config["pretrain"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] + rank)
    x = load_pool(config["data"])[rank::world]
    mae = ray.train.torch.prepare_model(build_mae(model_cfg, cfg))
    optimizer = torch.optim.AdamW(mae.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(config["seed"] + rank)
    steps_per_epoch = max(1, len(x) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                    pct_start=0.1)
    use_bf16 = device.type == "cuda"
    curve: list[float] = []
    for epoch in range(cfg.epochs):
        mae.train()
        order = torch.randperm(len(x), generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            batch = x[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device)
            target = patchify(batch, model_cfg.patch_size)
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                                 + 1e-6).sqrt()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                pred, mask = mae(batch)
            per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
            loss = (per_patch * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        curve.append(float(np.mean(losses)))
        state = None
        if epoch == cfg.epochs - 1:
            state = {**mae_to_encoder(unwrap(mae).state_dict(), model_cfg.num_layers),
                     CURVE_KEY: torch.tensor(curve)}
        report({"epoch": epoch + 1, "mim_loss": curve[-1]}, state)


def base_fingerprint(model: ModelConfig, pretrain: PretrainConfig, pool_path: Path,
                     pool_size: int | None, seed: int) -> str:
    """Identity of a base: its settings without how the job is spread over workers
    (:class:`~engine.config.TrainScaling`), so one base serves every cluster shape."""
    scaling = {f.name for f in fields(TrainScaling)}
    settings = {k: v for k, v in asdict(pretrain).items() if k not in scaling}
    network = to_dict(model)
    if not network["options"]:  # bases made before encoders took options keep their identity
        del network["options"]
    payload = json.dumps([network, settings, pool_path.parent.name, pool_size, seed],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pretrained_base(model: ModelConfig, pretrain: PretrainConfig, data: DataConfig, seed: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The MIM base encoder: from the cache, or trained now on Ray Train and cached.

    Returns the encoder state (``encoder.*`` keys) and facts about it (loss curve, path).
    """
    from engine.fl.client import shard_builder

    if model.arch != "vit":
        raise ValueError("pretrain.method=mim needs model.arch=vit (MONAI's MAE is a ViT)")
    builder = shard_builder(data)
    pool_path = builder.pool()
    cache_dir = builder.cache_dir
    folder = cache_dir / "bases" / base_fingerprint(model, pretrain, pool_path, data.pool_size,
                                                    seed)
    weights, meta_file = folder / "encoder.pt", folder / "meta.json"
    if weights.exists() and meta_file.exists():
        logger.info("reusing the MIM base %s", folder)
        meta = json.loads(meta_file.read_text())
        return torch.load(weights, weights_only=True), {**meta, "cached": True}
    logger.info("pretraining the MIM base (%d epochs) into %s", pretrain.epochs, folder)
    result = fit_trainer(mim_loop, {"model": model, "pretrain": pretrain, "data": data,
                                    "seed": seed},
                         num_workers=pretrain.num_workers, use_gpu=pretrain.use_gpu,
                         storage_path=str(cache_dir / "bases" / "ray-train"),
                         name=folder.name, knob="pretrain",
                         cpus_per_worker=pretrain.cpus_per_worker,
                         gpus_per_worker=pretrain.gpus_per_worker)
    state = load_checkpoint_state(result.checkpoint)
    curve = [{"epoch": i + 1, "mim_loss": float(v)} for i, v in enumerate(state.pop(CURVE_KEY))]
    meta = {"path": str(folder), "curve": curve, "fingerprint": folder.name}
    buf = io.BytesIO()
    torch.save(state, buf)
    # weights first, then meta: a reader that sees both sees both whole
    write_atomic(weights, buf.getvalue())
    write_atomic(meta_file, json.dumps(meta))
    return state, {**meta, "cached": False}
