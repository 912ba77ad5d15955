"""``train.augment`` (MONAI transforms on the training batches) and ``train.precision=fp16``
(refused off CUDA) in the plain client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ConfigError, ModelConfig, TrainConfig, from_dict, load_config
from engine.fl.client import Client, ClientSpec
from engine.nn.augment import BatchAugment, Flip, Intensity, Noise, Rotate, Shift
from engine.nn.precision import autocast_dtype, grad_scaler
from strategies import FitIns

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ModelConfig(arch="vit", hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)
ALL = [Flip(prob=1.0), Rotate(prob=1.0, degrees=30), Intensity(prob=1.0), Shift(prob=1.0),
       Noise(prob=1.0)]


def _client(spec: ClientSpec, **train: object) -> Client:
    cfg = TrainConfig(batch_size=16, precision="fp32", **train)  # type: ignore[arg-type]
    return Client(spec, TINY, cfg, seed=0, max_train_samples=48, max_eval_samples=16,
                  device="cpu")


def _fit(client: Client, encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return client.fit(FitIns(dict(encoder), ("breast",), {"round": 1, "seed": 3})).state


def test_batch_augment_changes_images_keeps_format_and_is_seeded() -> None:
    x = torch.randn(8, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    before, rng = x.clone(), torch.get_rng_state()
    out = BatchAugment(ALL, seed=5)(x)
    assert torch.equal(x, before)  # the input is left alone
    assert torch.equal(torch.get_rng_state(), rng)  # torch's global generator untouched
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert type(out) is torch.Tensor and out.is_contiguous(memory_format=torch.channels_last)
    assert bool((out != x).flatten(1).any(1).all())  # every image changed (prob 1)
    assert torch.equal(out, BatchAugment(ALL, seed=5)(x))  # same seed, same batch
    assert not torch.equal(out, BatchAugment(ALL, seed=6)(x))
    flipped = BatchAugment([Flip(prob=1.0)], seed=0)(x)
    assert torch.equal(flipped, x.flip(-1))  # MONAI's RandFlip on the columns
    # the batched rotation is MONAI's Rotate, image by image
    from monai.transforms import Rotate as MonaiRotate
    from monai.utils import convert_to_tensor

    angles = np.array([0.3, -0.2, 0.1, 0.25, 0.0, -0.5, 0.4, 0.05])
    rotated = Rotate().transform_batch(x, angles)
    for i, angle in enumerate(angles):
        ref = MonaiRotate(angle=float(angle), keep_size=True, mode="bilinear",
                          padding_mode="zeros", align_corners=False)(x[i])
        torch.testing.assert_close(rotated[i], convert_to_tensor(ref, track_meta=False),
                                   atol=1e-4, rtol=1e-4)
    # per-image draws: with prob 0.5 some images rotate, some do not
    half = BatchAugment([Rotate(prob=0.5)], seed=1)(x)
    changed = (half != x).flatten(1).any(1)
    assert 0 < int(changed.sum()) < len(x)


def test_augmented_fit_differs_and_reproduces_empty_is_bit_identical(spec: ClientSpec
                                                                     ) -> None:
    first = _client(spec)
    encoder = {k: v.clone() for k, v in first._export().items() if k.startswith("encoder.")}
    plain = _fit(first, encoder)
    empty = _fit(_client(spec, augment=()), encoder)
    assert all(torch.equal(plain[k], empty[k]) for k in plain)
    augmented = _fit(_client(spec, augment=("flip", "rotate")), encoder)
    again = _fit(_client(spec, augment=("flip", "rotate")), encoder)
    assert all(torch.equal(augmented[k], again[k]) for k in augmented)
    assert not all(torch.equal(plain[k], augmented[k]) for k in plain)


def test_augment_config_forms_and_errors() -> None:
    cfg = from_dict(TrainConfig, {"augment": ["flip", {"name": "rotate", "degrees": 10,
                                                       "prob": 0.25}]}, "train")
    assert cfg.augment == (Flip(), Rotate(prob=0.25, degrees=10.0))
    cfg = load_config("experiments/smoke.yaml", ["train.augment=[noise, {name: shift}]"])
    assert cfg.train.augment == (Noise(), Shift())
    for bad, match in [(["flop"], r"train\.augment\[0\]: unknown augmentation 'flop'; "
                                  r"choices: \['flip', 'intensity'"),
                       ([{"name": "rotate", "deg": 3}], r"train\.augment\[0\]\.deg"),
                       ([{"name": "flip", "prob": 2}], r"prob must be in \[0, 1\]"),
                       ([{"prob": 1}], r"train\.augment\[0\]: expected an augmentation name")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(TrainConfig, {"augment": bad}, "train")


def test_fp16_is_refused_off_cuda(spec: ClientSpec) -> None:
    with pytest.raises(ValueError, match=r"fp16 needs a CUDA device, this runs on cpu"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        grad_scaler("fp16", "cpu")
    assert grad_scaler("bf16", "cpu") is None and grad_scaler("auto", "cpu") is None
    with pytest.raises(ValueError, match=r"use train\.precision=bf16 on a CPU"):
        Client(spec, TINY, TrainConfig(precision="fp16"), device="cpu")
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs CUDA, but the clients "
                                          r"\(clients.num_gpus=0\)"):
        load_config("experiments/smoke.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"MIM pretraining \(pretrain.use_gpu=false\)"):
        load_config("experiments/quickstart.yaml", ["train.precision=fp16",
                                                    "clients.num_gpus=1"])
    with pytest.raises(ConfigError, match=r"DP-SGD steps through Opacus without fp16's"):
        load_config("experiments/smoke.yaml", ["train.precision=fp16", "clients.num_gpus=1",
                                               "privacy.dp.enabled=true"])
    ok = load_config("experiments/smoke.yaml", ["train.precision=fp16", "clients.num_gpus=1"])
    assert ok.train.precision == "fp16"
