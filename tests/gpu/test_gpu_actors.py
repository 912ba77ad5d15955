"""GPU checks: skipped on machines without CUDA (CI), run on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REPO = Path(__file__).resolve().parents[2]


def test_packed_actors_see_the_gpu(tmp_path: Path, data_root: Path, shard_cache: Path) -> None:
    import ray

    from engine.cluster.pool import ActorPool
    from engine.config import load_config
    from engine.data import ShardBuilder, domain_catalog
    from engine.fl.client import ClientSpec

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    cfg = load_config(REPO / "experiments" / "smoke.yaml",
                      ["clients.num_actors=4", "clients.num_gpus=0.25",
                       f"data.cache_dir={shard_cache}"])
    builder = ShardBuilder(domain_catalog(), data_root, shard_cache)
    specs = [ClientSpec(f"breast-{i}", {"breast": {s: str(p) for s, p in
                                                   builder.domain("breast").items()}})
             for i in range(4)]
    pool = ActorPool.start(cfg, specs)
    try:
        described = pool.describe()
        assert len({d["pid"] for d in described}) == 4
        for d in described:
            assert d["cuda"] and d["gpu_ids"], d
            assert all(c["device"].startswith("cuda") and c["bf16"] for c in d["clients"])
        assert len({tuple(d["gpu_ids"]) for d in described}) <= torch.cuda.device_count()
    finally:
        pool.shutdown()


def test_client_trains_in_bf16_on_the_gpu(data_root: Path, shard_cache: Path) -> None:
    from engine.config import ModelConfig, TrainConfig
    from engine.data import ShardBuilder, domain_catalog
    from engine.fl.client import Client, ClientSpec
    from strategies import FitIns, nonfinite_keys

    builder = ShardBuilder(domain_catalog(), data_root, shard_cache)
    spec = ClientSpec("pneumonia", {"pneumonia": {s: str(p) for s, p in
                                                  builder.domain("pneumonia").items()}})
    client = Client(spec, ModelConfig(arch="resnet18"), TrainConfig(batch_size=128), seed=0)
    assert client.device.type == "cuda" and client.use_bf16
    encoder = {k: v for k, v in client._export().items() if k.startswith("encoder.")}
    res = client.fit(FitIns(encoder, ("pneumonia",), {"round": 1}))
    assert not nonfinite_keys(res.state) and res.metrics["train_loss"] > 0
