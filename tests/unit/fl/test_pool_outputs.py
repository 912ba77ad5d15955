"""``privacy.transfer: predictions``: the teacher stays home. A client returns its teacher's
outputs on the public pool (features and each domain head's logits, one pass) and no
weights; no tensor shaped like a weight leaves it (the privacy audit); the distillation
trains on those rows exactly as it would on the teacher's network. And heterogeneous
architectures: two encoder families (``vit``, ``resnet18``) in one federation, in both
transfer modes. Real shards, tiny caps, the actor body in-process (no Ray), the real
distillation job in-process (no Ray Train).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch

from engine.cluster.actors import ClientHost
from engine.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from engine.fl.client import Client, ClientSpec, shard_builder
from engine.fl.fitcache import FitCache
from engine.fl.simulation import invalid_parts
from engine.nn.models import build_model
from engine.train.distill import DistillError, DistillJob, FrozenModels, frozen_outputs
from engine.train.mim import load_pool
from strategies import StrategyContext, create_strategy
from strategies.distill import (
    DistillRequest,
    DistillResult,
    DistillService,
    DistillSettings,
    Teacher,
)
from strategies.state import encoder_of, head_of
from strategies.types import ClientInfo, FitIns, FitRes, PoolOutputs

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
TRAIN = TrainConfig(batch_size=32, lr=1e-3, local_epochs=1)
DOMAINS = ("breast", "pathology")
POOL = 120  # no weight of TINY has a leading 120 (its qkv is 96 x 32)
SETTINGS = DistillSettings(steps=4, eval_every=2, batch_size=32)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    data: DataConfig
    specs: dict[str, ClientSpec]
    pool: torch.Tensor


@pytest.fixture(scope="module")
def world(data_root: Path, shard_cache: Path) -> World:
    data = DataConfig(domains=DOMAINS, data_root=str(data_root), cache_dir=str(shard_cache),
                      download=False, pool_size=POOL, max_train_samples=32,
                      max_eval_samples=16)
    builder = shard_builder(data)
    specs = {d: ClientSpec(d, {d: {s: str(p) for s, p in builder.domain(d).items()}})
             for d in DOMAINS}
    return World(data, specs, load_pool(data))


def _ins(domain: str, **config: object) -> FitIns:
    torch.manual_seed(0)
    encoder = encoder_of(build_model(TINY, {}).state_dict())
    return FitIns(dict(encoder), (domain,), {"round": 1, "seed": 0, **config})


def _host(world: World, model: ModelConfig = TINY) -> ClientHost:
    return ClientHost(list(world.specs.values()), model, TRAIN, world.data, seed=0,
                      num_threads=1)


def leaving_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a message, wherever it sits (dataclass fields, mappings, lists)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from leaving_tensors(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, Mapping | MappingProxyType):
        for k, v in obj.items():
            yield from leaving_tensors(v, f"{path}[{k}]")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from leaving_tensors(v, f"{path}[{i}]")


def audit_violations(res: FitRes, weight_shapes: set[tuple[int, ...]], pool_size: int
                     ) -> list[str]:
    """What in ``res`` breaks the predictions-mode rule: a tensor whose leading dimension
    is not the public pool's or whose shape is a weight's, or a metric that is no scalar."""
    bad = [f"{p} {tuple(t.shape)}" for p, t in leaving_tensors(res)
           if t.ndim == 0 or t.shape[0] != pool_size or tuple(t.shape) in weight_shapes]
    bad += [f"metrics[{k}]" for k, v in res.metrics.items()
            if not isinstance(v, int | float) or isinstance(v, bool)]
    return bad


def test_a_client_returns_pool_outputs_and_no_weights(world: World) -> None:
    client = Client(world.specs["pathology"], TINY, TRAIN, seed=0, max_train_samples=32,
                    max_eval_samples=24, device="cpu",
                    pool=lambda: _host_pool(world))
    weights = client.fit(_ins("pathology"))
    preds = client.fit(_ins("pathology", pool_outputs=True))
    assert weights.pool_outputs is None and weights.state
    out = preds.pool_outputs
    assert preds.state == {} and isinstance(out, PoolOutputs)
    assert out.features.shape == (POOL, 32) and out.features.dtype == torch.float32
    assert set(out.logits) == {"pathology"} and out.logits["pathology"].shape == (POOL, 9)
    assert out.nbytes == POOL * (32 + 9) * 4
    assert set(preds.metrics) == set(weights.metrics) and invalid_parts(preds) == []
    # the distiller's targets from these rows equal those of running the weights teacher
    as_weights = Teacher("pathology", "pathology", "multi-class", 9,
                         {**encoder_of(weights.state), **head_of(weights.state, "pathology")})
    as_outputs = Teacher("pathology", "pathology", "multi-class", 9, {}, outputs=out)
    rows = torch.randperm(POOL, generator=torch.Generator().manual_seed(3))
    got = {}
    for name, teacher in (("weights", as_weights), ("outputs", as_outputs)):
        request = DistillRequest(student={}, teachers=[teacher], previous={},
                                 heads={"pathology": ("multi-class", 9)}, settings=SETTINGS)
        models = FrozenModels(request, TINY, torch.device("cpu"))
        models.pool_size = POOL
        got[name] = frozen_outputs(models, world.pool[rows], torch.device("cpu"), rows=rows)
    for key in ("probs", "conf", "feats", "logits"):
        torch.testing.assert_close(got["outputs"][key]["pathology"],
                                   got["weights"][key]["pathology"], atol=1e-5, rtol=1e-4)
    with pytest.raises(DistillError, match="no random view"):
        frozen_outputs(models, world.pool[:8], torch.device("cpu"))


def _host_pool(world: World):  # the public pool as a client reads it
    from engine.fl.client import read_pool
    from engine.fl.relevance import PublicPool

    return PublicPool.from_shard(read_pool(world.data))


def test_no_weight_shaped_tensor_leaves_a_client_in_predictions_mode(world: World) -> None:
    """The privacy audit of ``predictions``: everything a client actor returns from a fit the
    universal strategy asks for is a scalar metric or has one row per public pool image (and
    no weight's shape); the same audit on a ``weights`` fit fails, so it can fail."""
    host = _host(world)
    infos = host.infos()
    heads = {i.cid: i.num_classes[i.cid] for i in infos}
    shapes = {tuple(v.shape) for v in build_model(TINY, heads).state_dict().values()}
    assert POOL not in {i.num_train for i in infos}  # the audit tells the two apart
    results = {}
    for transfer in ("weights", "predictions"):
        strategy = create_strategy("universal", {"num_stages": 1, "local_epochs": 1,
                                                 "relevance": True},
                                   StrategyContext(seed=0, distill=SETTINGS,
                                                   transfer=transfer))
        torch.manual_seed(0)
        strategy.initialize(infos, encoder_of(build_model(TINY, {}).state_dict()))
        for cid, ins in strategy.configure_fit(1, list(DOMAINS)).items():
            assert ins.config.get("pool_outputs", False) is (transfer == "predictions")
            ins.config = {**ins.config, "round": 1, "seed": 0}  # as the round loop adds them
            results[transfer, cid] = host.fit(cid, {}, ins)
    for cid in DOMAINS:
        preds = results["predictions", cid]
        assert preds.state == {} and preds.pool_outputs is not None
        assert preds.pool_scores is not None  # relevance rides along: also one per image
        assert audit_violations(preds, shapes, POOL) == [], cid
        assert audit_violations(results["weights", cid], shapes, POOL), cid
        assert set(vars(preds)) == {"cid", "state", "num_examples", "metrics", "pool_scores",
                                    "pool_outputs"}


def test_the_fit_cache_and_the_validity_check_know_pool_outputs(tmp_path: Path) -> None:
    out = PoolOutputs(features=torch.rand(5, 3), logits={"a": torch.rand(5, 2)})
    cache = FitCache(tmp_path, ExperimentConfig())
    ins = FitIns({"encoder.w": torch.zeros(2)}, (), {"round": 1, "pool_outputs": True})
    cache.put("a", ins, FitRes("a", {}, 3, {"x": 1.0}, pool_outputs=out))
    hit = cache.get("a", ins)
    assert hit is not None and hit.state == {} and hit.pool_outputs is not None
    assert torch.equal(hit.pool_outputs.features, out.features)
    assert torch.equal(hit.pool_outputs.logits["a"], out.logits["a"])
    bad = PoolOutputs(features=torch.rand(5, 3), logits={"a": torch.full((5, 2), math.nan)})
    assert invalid_parts(FitRes("a", {}, 3, pool_outputs=bad)) == ["pool_outputs.logits.a"]
    with pytest.raises(ValueError, match="one row per pool image"):
        PoolOutputs(features=torch.rand(5, 3), logits={"a": torch.rand(4, 2)})
    with pytest.raises(ValueError, match="teacher c/a: pool outputs need"):
        Teacher("c", "a", "binary", 3, {}, outputs=out)
    with pytest.raises(ValueError, match="both weights and pool outputs"):
        Teacher("c", "a", "binary", 2, {"encoder.w": torch.ones(1)}, outputs=out)


class InProcessDistiller(DistillService):
    """The real distillation job (:class:`DistillJob`), run in this process."""

    def __init__(self, model: ModelConfig, pool: torch.Tensor) -> None:
        self.model, self.pool = model, pool
        self.jobs: list[DistillJob] = []

    def distil(self, request: DistillRequest) -> DistillResult:
        job = DistillJob(request, self.model, self.pool, torch.device("cpu"))
        self.jobs.append(job)
        curve = job.run()
        return DistillResult(state=job.student_state(), metrics={}, curve=curve)


@pytest.mark.parametrize("transfer", ["weights", "predictions"])
def test_two_encoder_families_in_one_federation(world: World, transfer: str) -> None:
    """pathology's hospital trains a ResNet-18, breast's the global ViT: the server builds
    the ResNet teacher from the declared family (weights) or uses only its outputs
    (predictions); the global student stays a ViT with both heads."""
    model = dataclasses.replace(TINY, domain_arch=MappingProxyType({"pathology":
                                                                    "resnet18"}))
    host = _host(world, model)
    infos = {i.cid: i for i in host.infos()}
    assert infos["pathology"].arch == "resnet18" and infos["breast"].arch is None
    strategy = create_strategy("universal", {"num_stages": 1, "local_epochs": 1},
                               StrategyContext(seed=0, distill=SETTINGS, transfer=transfer))
    torch.manual_seed(0)
    strategy.initialize(list(infos.values()), encoder_of(build_model(TINY, {}).state_dict()))
    strategy.distiller = distiller = InProcessDistiller(TINY, world.pool)
    fits = strategy.configure_fit(1, list(DOMAINS))
    assert fits["pathology"].state == {} and fits["pathology"].config["arch"] == "resnet18"
    assert fits["breast"].state and "arch" not in fits["breast"].config
    results = {}
    for cid, ins in fits.items():
        ins.config = {**ins.config, "round": 1, "seed": 0}
        results[cid] = host.fit(cid, {}, ins)
    if transfer == "weights":  # the teacher is a ResNet: 512 features into its head
        assert results["pathology"].state["heads.pathology.weight"].shape == (9, 512)
        assert results["breast"].state["heads.breast.weight"].shape == (2, 32)
    else:
        assert results["pathology"].pool_outputs.features.shape == (POOL, 512)
        assert results["breast"].pool_outputs.features.shape == (POOL, 32)
    strategy.aggregate_fit(1, results, {})
    student = distiller.jobs[0].module
    assert student.proj["pathology"].out_features == 512  # matched to its teachers' width
    assert student.proj["breast"].out_features == 32
    curve = strategy.curves[1]
    assert curve and all(math.isfinite(r["loss"]) for r in curve)
    state = strategy.global_state()
    net = build_model(TINY, {d: infos[d].num_classes[d] for d in DOMAINS})
    net.load_state_dict(state, strict=True)  # the global model keeps model.arch
    # the global model is what every evaluation sends, also to the ResNet hospital
    res = host.evaluate("pathology", {}, strategy.configure_evaluate(1, ["pathology"], "val")
                        ["pathology"])
    assert 0.0 <= res.metrics["pathology"]["acc"] <= 1.0


def test_a_client_refuses_a_family_it_does_not_declare(world: World) -> None:
    client = Client(world.specs["breast"], TINY, TRAIN, seed=0, max_train_samples=32,
                    max_eval_samples=24, device="cpu")
    assert client.info().arch is None
    with pytest.raises(ValueError, match="client breast: asked to train encoder family"):
        client.fit(FitIns({}, ("breast",), {"arch": "resnet18"}))


def test_client_info_carries_no_arch_by_default() -> None:
    info = ClientInfo("a", ("a",), {"a": "binary"}, {"a": 2}, 10)
    assert info.arch is None
