"""Pool scores (per-sample relevance, ``strategy.relevance``): a client scores the server's
public pool for how much each image looks like its own data, on its own node, and returns
one float per PUBLIC image and nothing else new. No Ray is started.

The pool is the real MedNIST half (capped), whose ids name the MedNIST class, so a CT
client's scores can be checked against the pool's CT / X-ray / MRI images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig, load_config
from engine.data.catalog import domain_catalog
from engine.fl.client import Client, ClientSpec, read_pool, shard_builder
from engine.fl.fitcache import FitCache
from engine.fl.relevance import PublicPool, pool_relevance, renormalise
from engine.fl.simulation import invalid_parts
from engine.nn.models import build_model
from engine.train.mim import load_pool, pool_composition
from strategies import StrategyContext, create_strategy
from strategies.distill import DistillSettings
from strategies.state import encoder_of
from strategies.types import FitIns, FitRes

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)
TRAIN = TrainConfig(batch_size=32, lr=1e-3, local_epochs=1)
DOMAINS = ("ct-region", "mr-xr")
FITRES_FIELDS = {"cid", "state", "num_examples", "metrics",  # before pool scores
                 "pool_outputs"}  # (None unless privacy.transfer=predictions asks)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class World:
    data: DataConfig
    paths: dict[str, dict[str, str]]
    pool: PublicPool
    kinds: np.ndarray  # the MedNIST class of every pool image (from its id)


@pytest.fixture(scope="module")
def world(data_root: Path, shard_cache: Path) -> World:
    data = DataConfig(domains=DOMAINS, data_root=str(data_root), cache_dir=str(shard_cache),
                      download=False, pool_size=600, max_train_samples=300,
                      max_eval_samples=100)
    builder = shard_builder(data)
    paths = {d: {s: str(p) for s, p in builder.domain(d).items()} for d in DOMAINS}
    shard = read_pool(data)
    kinds = np.asarray([str(i).split("/")[0] for i in shard.ids])
    return World(data, paths, PublicPool.from_shard(shard), kinds)


def _client(world: World, domain: str, pool: bool = True) -> Client:
    return Client(ClientSpec(domain, {domain: world.paths[domain]}), TINY, TRAIN, seed=0,
                  max_train_samples=300, max_eval_samples=100, device="cpu",
                  pool=(lambda: world.pool) if pool else None)


def _ins(domain: str, **config: object) -> FitIns:
    torch.manual_seed(0)
    encoder = encoder_of(build_model(TINY, {}).state_dict())
    return FitIns(dict(encoder), (domain,), {"round": 1, "seed": 0, **config})


def _auc(scores: torch.Tensor, positive: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the ``positive`` images (rank statistic)."""
    ranks = torch.argsort(torch.argsort(scores)).numpy() + 1.0
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("domain", DOMAINS)
def test_a_client_scores_the_pool_images_of_its_own_modality_highest(world: World,
                                                                     domain: str) -> None:
    """ct-region holds MedNIST's CT classes, mr-xr its MRI / X-ray ones; the pool holds the
    other half of all six classes: each client must score its own kinds above the others."""
    own = set(domain_catalog()[domain].label_names)
    res = _client(world, domain).fit(_ins(domain, score_pool=True))
    scores = res.pool_scores
    assert scores is not None
    mine = np.isin(world.kinds, sorted(own))
    by_kind = {k: float(scores[torch.from_numpy(world.kinds == k)].mean())
               for k in sorted(set(world.kinds))}
    assert min(by_kind[k] for k in own) > max(v for k, v in by_kind.items() if k not in own), \
        by_kind
    assert _auc(scores, mine) > 0.8, by_kind


def test_pool_scores_are_one_float_per_public_image_and_nothing_else(world: World) -> None:
    client = _client(world, "ct-region")
    plain = client.fit(_ins("ct-region"))
    scored = client.fit(_ins("ct-region", score_pool=True))
    again = _client(world, "ct-region").fit(_ins("ct-region", score_pool=True))
    assert plain.pool_scores is None
    s = scored.pool_scores
    assert isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert s.shape == (len(world.pool),) == (600,)
    assert len(world.pool) != client.info().num_train  # the check tells the two apart
    assert bool(((s >= 0) & (s <= 1)).all()) and bool(torch.isfinite(s).all())
    assert torch.equal(s, again.pool_scores)  # deterministic
    # scoring changes nothing else: same weights, same metric names, one new field
    assert set(vars(scored)) == FITRES_FIELDS | {"pool_scores"}
    assert set(vars(plain)) - {"pool_scores"} == FITRES_FIELDS
    assert all(torch.equal(plain.state[k], scored.state[k]) for k in plain.state)
    assert set(plain.metrics) == set(scored.metrics)
    assert scored.num_examples == plain.num_examples
    other_round = client.fit(_ins("ct-region", score_pool=True, seed=1))
    assert not torch.equal(s, other_round.pool_scores)


def test_the_pool_is_the_one_the_distillation_reads(world: World) -> None:
    x = load_pool(world.data)
    assert torch.equal(x, world.pool.images)
    assert sum(pool_composition(world.data).values()) == len(world.pool)


def test_the_actor_host_passes_the_scores_through(world: World) -> None:
    """The universal strategy with relevance on asks for scores; the actor body (no Ray
    started) reads the pool on its node and returns the client's FitRes unchanged."""
    from engine.cluster.actors import ClientHost

    host = ClientHost([ClientSpec("ct-region", {"ct-region": world.paths["ct-region"]})],
                      TINY, TRAIN, world.data, seed=0, num_threads=1)
    strategy = create_strategy("universal", {"num_stages": 1, "local_epochs": 1,
                                             "relevance": True},
                               StrategyContext(seed=0, distill=DistillSettings()))
    torch.manual_seed(0)
    strategy.initialize(host.infos(), encoder_of(build_model(TINY, {}).state_dict()))
    ins = strategy.configure_fit(1, ["ct-region"])["ct-region"]
    assert ins.config["score_pool"] is True
    ins.config = {**ins.config, "round": 1, "seed": 0}  # as the round loop adds them
    res = host.fit("ct-region", {}, ins)
    assert set(vars(res)) == FITRES_FIELDS | {"pool_scores"}
    assert res.pool_scores is not None and res.pool_scores.shape == (len(world.pool),)
    assert host.clients["ct-region"].pool is not None


def test_a_client_without_a_pool_refuses_to_score(world: World) -> None:
    with pytest.raises(ValueError, match="client mr-xr: asked for pool scores"):
        _client(world, "mr-xr", pool=False).fit(_ins("mr-xr", score_pool=True))


def test_nan_pool_scores_make_an_invalid_update() -> None:
    state = {"encoder.w": torch.ones(2)}
    assert invalid_parts(FitRes("a", state, 1)) == []
    assert invalid_parts(FitRes("a", state, 1, pool_scores=torch.rand(4))) == []
    assert invalid_parts(FitRes("a", state, 1,
                                pool_scores=torch.tensor([0.1, math.nan]))) == ["pool_scores"]
    bad = {"encoder.w": torch.tensor([math.inf, 0.0])}
    assert invalid_parts(FitRes("a", bad, 1, pool_scores=torch.tensor([math.inf]))) == [
        "encoder.w", "pool_scores"]


def test_the_fit_cache_keeps_the_pool_scores(tmp_path: Path) -> None:
    cache = FitCache(tmp_path, ExperimentConfig())
    ins = FitIns({"encoder.w": torch.zeros(2)}, (), {"round": 1, "score_pool": True})
    scores = torch.rand(5)
    cache.put("a", ins, FitRes("a", {"encoder.w": torch.ones(2)}, 3, {"x": 1.0}, scores))
    hit = cache.get("a", ins)
    assert hit is not None and torch.equal(hit.pool_scores, scores)
    plain = FitIns({"encoder.w": torch.zeros(2)}, (), {"round": 1})
    assert cache.get("a", plain) is None  # the request is part of the key
    cache.put("a", plain, FitRes("a", {"encoder.w": torch.ones(2)}, 3))
    assert cache.get("a", plain).pool_scores is None


def test_the_discriminator_is_seeded_and_separates_two_kinds_of_features() -> None:
    g = torch.Generator().manual_seed(0)
    own = torch.randn(200, 8, generator=g) + 2.0
    pool = torch.cat([torch.randn(100, 8, generator=g) + 2.0,   # like the client's
                      torch.randn(300, 8, generator=g) - 2.0])  # unlike
    a, b = pool_relevance(own, pool, 3), pool_relevance(own, pool, 3)
    assert torch.equal(a, b) and a.shape == (400,) and a.dtype == torch.float32
    assert float(a[:100].min()) > float(a[100:].max())
    assert not torch.equal(a, pool_relevance(own, pool, 4, max_samples=64))
    with pytest.raises(ValueError, match="pool scores need"):
        pool_relevance(own[:0], pool, 0)


def test_renormalise_puts_images_on_another_scale() -> None:
    raw = torch.rand(4, 3, 28, 28)
    a = (raw - 0.3) / 0.2
    b = renormalise(a, (0.3,) * 3, (0.2,) * 3, (0.5,) * 3, (0.25,) * 3)
    torch.testing.assert_close(b, (raw - 0.5) / 0.25)


def test_relevance_is_a_config_key_of_the_universal_strategy() -> None:
    cfg = load_config(None, ["strategy.name=universal", "strategy.relevance=true"])
    assert cfg.strategy.options.relevance is True
    assert load_config(None, ["strategy.name=universal"]).strategy.options.relevance is False
    with pytest.raises(ValueError, match=r"strategy\.relevance"):
        load_config(None, ["strategy.name=universal", "strategy.relevance=3"])
