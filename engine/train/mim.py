"""Masked image modelling on the server's unlabelled pool: the base encoder.

MONAI's ``MaskedAutoEncoderViT`` is trained on Ray Train (DDP) with the encoder sizes of
``model``; its encoder weights are then renamed into the keys of the umim ViT encoder. A
base is cached under ``<cache_dir>/bases/<fingerprint>/`` and reused by every experiment
with the same settings and pool; a run whose directory is remote (``s3://...``) keeps its
base in ``<run dir>/base/`` and its Train job in ``<run dir>/train/`` instead, where every
node reads them. The forward pass runs as ``train.precision`` says
(:mod:`engine.nn.precision`), and every DDP rank runs the same number of steps.
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
from engine.data.unify import UNIFIED_CHANNELS, UNIFIED_SIZE
from engine.nn.precision import autocast, grad_scaler, optimizer_step
from engine.records.storage import Storage
from engine.train.launch import fit_trainer, load_checkpoint_state, report, unwrap
from strategies.state import encoder_key

logger = logging.getLogger(__name__)
CURVE_KEY = "_curve"
DECODER_PREFIX = "mae_decoder."
"""Prefix of the MAE's own tensors (decoder, mask and class tokens) in a Train checkpoint."""


def _as_float32(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output in float32 (a no-op when it already is)."""
    return output.float()


def build_mae(model: ModelConfig, pretrain: PretrainConfig) -> torch.nn.Module:
    """MONAI ``MaskedAutoEncoderViT`` whose encoder matches :class:`engine.nn.models.ViTEncoder`.

    MONAI's forward writes the decoder's visible tokens into a float32 tensor of mask
    tokens (an index put, which needs equal dtypes); under bf16 autocast ``decoder_embed``
    returns bf16. A forward hook hands its output back in float32, so the MAE trains under
    autocast with its state-dict keys unchanged (the decoder blocks autocast again).
    """
    from monai.networks.nets import MaskedAutoEncoderViT

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        mae = MaskedAutoEncoderViT(
            in_channels=UNIFIED_CHANNELS, img_size=UNIFIED_SIZE, patch_size=model.patch_size,
            hidden_size=model.hidden_size, mlp_dim=model.mlp_dim, num_layers=model.num_layers,
            num_heads=model.num_heads, masking_ratio=pretrain.mask_ratio,
            decoder_hidden_size=pretrain.decoder_hidden_size,
            decoder_mlp_dim=pretrain.decoder_mlp_dim,
            decoder_num_layers=pretrain.decoder_num_layers,
            decoder_num_heads=pretrain.decoder_num_heads, pos_embed_type="sincos",
            decoder_pos_embed_type="sincos", dropout_rate=model.dropout, spatial_dims=2)
    mae.decoder_embed.register_forward_hook(_as_float32)
    return mae


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


def mae_decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The MAE's tensors that are not the encoder's (class token, decoder, mask tokens):
    what :func:`mae_to_encoder` drops, under their MAE names."""
    return {k: v.detach().clone() for k, v in state.items()
            if not k.startswith(("patch_embedding.", "blocks."))}


def tie_mae(mae: torch.nn.Module, encoder: torch.nn.Module) -> torch.nn.Module:
    """``mae`` whose encoder modules *are* those of the umim ViT ``encoder``
    (:class:`engine.nn.models.ViTEncoder`, keys ``vit.*``): its patch embedding, and its
    blocks followed by the final norm. The MAE's loss then trains the encoder itself."""
    vit = encoder.vit
    mae.patch_embedding = vit.patch_embedding
    mae.blocks = torch.nn.Sequential(*vit.blocks, vit.norm)
    return mae


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, patch * patch * C)`` in the MAE's token order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def load_pool(data: DataConfig) -> torch.Tensor:
    """The server pool's normalised images (a seeded subsample when ``data.pool_size`` is set:
    :func:`~engine.data.pool.pool_subset`, stratified by source when the pool has several).

    The pool shard is found (or built) on the node this runs on, by
    :func:`engine.fl.client.read_pool`: the clients' pool scores read the same images in
    the same order.
    """
    from engine.fl.client import read_pool

    x, _ = read_pool(data).tensors()
    return x


def pool_composition(data: DataConfig, *, capped: bool = True) -> dict[str, int]:
    """What the server's pool held: images per source, e.g. ``{"mednist": 29477,
    "breast": 55, ...}`` (``"mednist"``: the MedNIST half; then every client domain that
    gave ``data.pool_share`` of its train split, and every one of ``data.pool_sources``).

    Parameters
    ----------
    data
        The experiment's data settings (the pool is found, or built, on this node).
    capped
        Count the images MIM and distillation train on (after ``data.pool_size``, as
        :func:`load_pool` cuts it); ``False``: the whole pool shard.
    """
    from engine.fl.client import shard_builder

    cap = data.pool_size if capped else None
    return shard_builder(data).pool_composition(cap=cap, seed=data.mednist_seed)


def steps_per_epoch(pool_size: int, world: int, batch_size: int) -> int:
    """MIM steps per epoch, the same on every one of ``world`` DDP ranks.

    Rank ``r`` trains on ``pool[r::world]``, whose length differs by one across ranks; the
    steps come from the smallest shard (``pool_size // world``), so no rank waits for ever
    in an all-reduce the others never join. At least one step.

    Raises
    ------
    ValueError
        When the pool has fewer images than there are ranks (a rank would have none).
    """
    if pool_size < world:
        raise ValueError(f"the pool has {pool_size} images, fewer than the {world} MIM "
                         "workers (pretrain.num_workers)")
    return max(1, (pool_size // world) // batch_size)


def mae_loss(mae: torch.nn.Module, batch: torch.Tensor, patch_size: int, precision: str
             ) -> torch.Tensor:
    """The MAE objective on one batch: mean squared error of the per-patch normalised pixels
    over the masked patches (the forward pass under ``precision``)."""
    target = patchify(batch, patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True)
                                                         + 1e-6).sqrt()
    with autocast(precision, batch.device):
        pred, mask = mae(batch)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mim_step(mae: torch.nn.Module, batch: torch.Tensor, patch_size: int,
             optimizer: torch.optim.Optimizer, scheduler: Any, precision: str, *,
             scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimiser (and schedule) step of the MAE on ``batch``; returns the loss
    (``scaler``: fp16's loss scaler, :func:`~engine.nn.precision.grad_scaler`)."""
    loss = mae_loss(mae, batch, patch_size, precision)
    optimizer.zero_grad(set_to_none=True)
    optimizer_step(loss, optimizer, scaler)
    scheduler.step()
    return float(loss.detach())


def mim_loop(config: dict[str, Any]) -> None:
    """Per-worker MAE training (Ray Train); ``config["precision"]`` is ``train.precision``."""
    import ray.train
    import ray.train.torch

    model_cfg: ModelConfig = config["model"]
    cfg: PretrainConfig = config["pretrain"]
    precision = str(config.get("precision", "auto"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"] + rank)
    pool = load_pool(config["data"])
    steps = steps_per_epoch(len(pool), world, cfg.batch_size)
    x = pool[rank::world]
    # MONAI's MAE has parameters no loss reaches (e.g. its classification token's path), so
    # DDP over several workers must look for unused ones (found by the two-node Train test)
    kwargs = {"find_unused_parameters": True} if world > 1 else None
    mae = ray.train.torch.prepare_model(build_mae(model_cfg, cfg),
                                        parallel_strategy_kwargs=kwargs)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(config["seed"] + rank)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                    total_steps=cfg.epochs * steps,
                                                    pct_start=0.1)
    scaler = grad_scaler(precision, device)  # fp16 only (CUDA); None otherwise
    curve: list[float] = []
    for epoch in range(cfg.epochs):
        mae.train()
        order = torch.randperm(len(x), generator=generator)
        losses = []
        for step in range(steps):
            batch = x[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]].to(device)
            losses.append(mim_step(mae, batch, model_cfg.patch_size, optimizer, scheduler,
                                   precision, scaler=scaler))
        curve.append(float(np.mean(losses)))
        state = None
        if epoch == cfg.epochs - 1:
            full = unwrap(mae).state_dict()
            state = {**mae_to_encoder(full, model_cfg.num_layers),
                     **{DECODER_PREFIX + k: v for k, v in mae_decoder_state(full).items()},
                     CURVE_KEY: torch.tensor(curve)}
        report({"epoch": epoch + 1, "mim_loss": curve[-1]}, state)


def base_fingerprint(model: ModelConfig, pretrain: PretrainConfig, pool_path: Path,
                     pool_size: int | None, seed: int, precision: str = "auto") -> str:
    """Identity of a base: its settings without how the job is spread over workers
    (:class:`~engine.config.TrainScaling`), so one base serves every cluster shape.

    An explicit ``precision`` (``fp32`` or ``bf16``) is part of it; ``auto`` is not, so
    every base made before precision was honoured keeps its identity.
    """
    scaling = {f.name for f in fields(TrainScaling)}
    settings = {k: v for k, v in asdict(pretrain).items() if k not in scaling}
    if precision != "auto":
        settings["precision"] = precision
    network = to_dict(model)
    if not network["options"]:  # bases made before encoders took options keep their identity
        del network["options"]
    payload = json.dumps([network, settings, pool_path.parent.name, pool_size, seed],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pretrained_base(model: ModelConfig, pretrain: PretrainConfig, data: DataConfig, seed: int,
                    *, precision: str = "auto", run: Storage | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The MIM base encoder: from the cache, or trained now on Ray Train and cached (see
    :func:`pretrained_mae`, which also gives its decoder)."""
    state, _, info = pretrained_mae(model, pretrain, data, seed, precision=precision, run=run)
    return state, info


def pretrained_mae(model: ModelConfig, pretrain: PretrainConfig, data: DataConfig, seed: int,
                   *, precision: str = "auto", run: Storage | None = None,
                   decoder: bool = False
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                              dict[str, Any]]:
    """The MIM base encoder (and its MAE decoder): from the cache, or trained now on Ray
    Train and cached.

    Parameters
    ----------
    model, pretrain, data, seed
        The base's settings (see :func:`base_fingerprint`).
    precision
        The experiment's ``train.precision`` (:mod:`engine.nn.precision`).
    run
        The run directory. When it is remote (``s3://...``) the base is kept in
        ``<run>/base/`` (weights, then ``meta.json``) and its Train job writes under
        ``<run>/train/mim-<fingerprint>``; otherwise (local, or ``None``) the base is
        cached under ``<cache_dir>/bases/<fingerprint>/``.
    decoder
        Also return the MAE's decoder (:func:`mae_decoder_state`, kept as ``decoder.pt``
        beside the encoder); a cached base without one (made before decoders were kept) is
        pretrained again.

    Returns
    -------
    tuple
        The encoder state (``encoder.*`` keys), the decoder state (``None`` unless
        ``decoder``) and facts about the base (loss curve, path).
    """
    from engine.fl.client import shard_builder

    if model.arch != "vit":
        raise ValueError("pretrain.method=mim needs model.arch=vit (MONAI's MAE is a ViT)")
    builder = shard_builder(data)
    pool_path = builder.pool()
    cache_dir = builder.cache_dir
    fingerprint = base_fingerprint(model, pretrain, pool_path, data.pool_size, seed, precision)
    if run is not None and not run.is_local:
        store, rel, where = run, "base", f"{run.uri}/base"
        train_path, train_name = f"{run.uri}/train", f"mim-{fingerprint}"
    else:
        folder = cache_dir / "bases" / fingerprint
        store, rel, where = Storage(folder.parent), fingerprint, str(folder)
        train_path, train_name = str(cache_dir / "bases" / "ray-train"), fingerprint
    weights, meta_file = f"{rel}/encoder.pt", f"{rel}/meta.json"
    decoder_file = f"{rel}/decoder.pt"
    if store.exists(weights) and store.exists(meta_file):
        meta = json.loads(store.read_text(meta_file))
        if meta.get("fingerprint") == fingerprint and (not decoder
                                                       or store.exists(decoder_file)):
            logger.info("reusing the MIM base %s", where)
            state = torch.load(io.BytesIO(store.read_bytes(weights)), weights_only=True)
            dec = (torch.load(io.BytesIO(store.read_bytes(decoder_file)), weights_only=True)
                   if decoder else None)
            return state, dec, {**meta, "cached": True}
        if meta.get("fingerprint") == fingerprint:
            logger.info("the cached MIM base %s has no MAE decoder (made before decoders "
                        "were kept): pretraining it again", where)
    logger.info("pretraining the MIM base (%d epochs) into %s", pretrain.epochs, where)
    result = fit_trainer(mim_loop, {"model": model, "pretrain": pretrain, "data": data,
                                    "seed": seed, "precision": precision},
                         num_workers=pretrain.num_workers, use_gpu=pretrain.use_gpu,
                         storage_path=train_path, name=train_name, knob="pretrain",
                         cpus_per_worker=pretrain.cpus_per_worker,
                         gpus_per_worker=pretrain.gpus_per_worker, steps=pretrain.epochs)
    state = load_checkpoint_state(result.checkpoint)
    curve = [{"epoch": i + 1, "mim_loss": float(v)} for i, v in enumerate(state.pop(CURVE_KEY))]
    dec = {k[len(DECODER_PREFIX):]: state.pop(k) for k in list(state)
           if k.startswith(DECODER_PREFIX)}
    meta = {"path": where, "curve": curve, "fingerprint": fingerprint}
    # weights first, then meta: a reader that sees both sees both whole
    for path, tensors in ((weights, state), (decoder_file, dec)):
        buf = io.BytesIO()
        torch.save(tensors, buf)
        store.write_bytes(path, buf.getvalue())
    store.write_text(meta_file, json.dumps(meta))
    return state, (dec if decoder else None), {**meta, "cached": False}
