"""A session: Ray, the clients' shards, the base encoder and the pool of client actors,
set up once and shared by every run of an experiment (main run, baselines, evaluations)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from engine.cluster.connect import connect_for
from engine.config import ExperimentConfig
from engine.data import domain_catalog, resolve_cache_dir, resolve_data_root
from engine.data.prepare import ShardRecipe
from engine.fl.client import ClientSpec, derive_seed, shard_builder
from engine.nn.models import build_model
from engine.records.progress import current
from engine.records.storage import Storage
from engine.train.distill import MAEPart, RayTrainDistiller
from strategies.state import encoder_of
from strategies.types import POOLED_CID

logger = logging.getLogger(__name__)


def machine_paths(cfg: ExperimentConfig, data_root: str | None = None,
                  cache_dir: str | None = None) -> dict[str, str]:
    """This machine's absolute data root and cache folder for ``cfg``: the arguments, else
    ``data.data_root`` / ``data.cache_dir``, else the environment and defaults."""
    return {"data_root": str(resolve_data_root(data_root or cfg.data.data_root)),
            "cache_dir": str(resolve_cache_dir(cache_dir or cfg.data.cache_dir))}


def resolve_paths(cfg: ExperimentConfig, data_root: str | None = None,
                  cache_dir: str | None = None) -> ExperimentConfig:
    """``cfg`` with :func:`machine_paths` filled in, for the processes of this run. Saved
    configs keep the paths as the user gave them, so a run directory replays elsewhere."""
    return replace(cfg, data=replace(cfg.data, **machine_paths(cfg, data_root, cache_dir)))


def client_specs(cfg: ExperimentConfig, pooled: bool, build: bool = True) -> list[ClientSpec]:
    """Every client's shard recipe, plus the pooled oracle client's if ``pooled``.

    The shards are built here once (so data errors surface before any actor starts); each
    actor then resolves its clients' recipes on its own node. ``build=False`` only lists
    the recipes, in the same order (a node that serves one client, e.g. a Flower
    SuperNode, resolves just its own).
    """
    catalog = domain_catalog(dict(cfg.data.extra_domains))
    unknown = [d for d in cfg.data.domains if d not in catalog]
    if unknown:
        raise ValueError(f"data.domains: unknown domain(s) {unknown}; known: {list(catalog)}")
    builder = shard_builder(cfg.data)
    n = cfg.data.clients_per_domain
    specs: list[ClientSpec] = []
    for domain in cfg.data.domains:
        for i in range(n):
            recipe = ShardRecipe(domain, num_clients=n, index=i, scheme=cfg.data.partition,
                                 seed=cfg.seed, alpha=cfg.data.dirichlet_alpha)
            if build:
                recipe.resolve(builder)
            specs.append(ClientSpec(domain if n == 1 else f"{domain}#{i}", recipes=(recipe,)))
    if pooled:
        specs.append(ClientSpec(POOLED_CID, recipes=tuple(ShardRecipe(d)
                                                          for d in cfg.data.domains)))
    return specs


def replicate_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seed of every replicate: ``seed + r`` for ``r < evaluation.replicates`` (replicate
    0 is the run's own seed)."""
    return [cfg.seed + r for r in range(cfg.evaluation.replicates)]


def initial_encoder(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The random initial global encoder, reproducible from ``cfg.seed``."""
    torch.manual_seed(derive_seed(cfg.seed, "initial-encoder"))
    model = build_model(cfg.model, {})
    return {k: v.detach().clone() for k, v in encoder_of(model.state_dict()).items()}


class Session:
    """Ray, the base encoder and the client actors of one experiment.

    Parameters
    ----------
    cfg
        The experiment (paths resolved, see :func:`resolve_paths`).
    pooled
        Also start the pooled oracle client (default: when a strategy of the experiment
        declares ``pooled``).
    observers
        See every object the client actors send back (see :class:`~engine.cluster.pool.ActorPool`).
    storage
        The run directory. When it is remote (``s3://...``), the MIM base is kept there
        (``<run dir>/base/``) instead of in the local cache (see
        :func:`~engine.train.mim.pretrained_base`).
    """

    def __init__(self, cfg: ExperimentConfig, *, pooled: bool | None = None,
                 observers: Sequence[Any] = (), storage: Storage | None = None) -> None:
        self.cfg = cfg
        self.storage = storage
        self.pooled = cfg.needs_pooled_client if pooled is None else pooled
        self.observers = list(observers)
        self.actors: Any = None
        self.base: dict[str, torch.Tensor] = {}
        self.base_info: dict[str, Any] = {}
        self.bases: dict[int, dict[str, torch.Tensor]] = {}
        self.base_infos: dict[int, dict[str, Any]] = {}
        self.decoders: dict[int, dict[str, torch.Tensor]] = {}

    def start(self) -> Session:
        """Connect to Ray, build shards, pretrain (or load) the base, start the actors.

        Pretraining runs before the actors start, so its Train workers get the CPUs and
        GPUs that the actors hold afterwards.
        """
        from engine.cluster.pool import ActorPool

        started = time.monotonic()
        current().task("connecting to Ray, building the clients' shards", 0)
        connect_for(self.cfg)
        specs = client_specs(self.cfg, self.pooled)
        current().task("the MIM base: from the cache or pretrained", 0)
        for seed in replicate_seeds(self.cfg):  # one base per replicate, each cached
            if self.cfg.pretrain.method == "mim":
                from engine.train.mim import pretrained_mae

                want_decoder = self.cfg.distill.mae_weight > 0
                base, decoder, info = pretrained_mae(
                    self.cfg.model, self.cfg.pretrain, self.cfg.data, seed,
                    precision=self.cfg.train.precision, run=self.storage, decoder=want_decoder)
                if decoder is not None:
                    self.decoders[seed] = decoder
                info["method"] = "mim"
            else:
                base, info = initial_encoder(replace(self.cfg, seed=seed)), {"method": "none"}
            self.bases[seed], self.base_infos[seed] = base, {**info, "seed": seed}
        self.base, self.base_info = self.bases[self.cfg.seed], self.base_infos[self.cfg.seed]
        current().task(f"starting the client actors ({len(specs)} clients)", 0)
        self.actors = ActorPool.start(self.cfg, specs, self.observers)
        logger.info("session started in %.1f s (base: %s)", time.monotonic() - started,
                    self.base_info["method"])
        return self

    def base_for(self, seed: int) -> dict[str, torch.Tensor]:
        """The base encoder of the replicate with ``seed``."""
        if seed not in self.bases:
            raise KeyError(f"no base encoder for seed {seed}; replicate seeds: "
                           f"{sorted(self.bases)}")
        return self.bases[seed]

    def distiller(self, storage: Storage, callbacks: Any = None, seed: int | None = None
                  ) -> RayTrainDistiller:
        """A Ray Train distiller writing its checkpoints under ``<run dir>/train``, on the
        run directory's filesystem (``s3://...`` too; ``callbacks``: request -> Ray Train
        callbacks, see ``RayTrainDistiller``). With ``distill.mae_weight > 0`` it carries
        the MAE decoder of the base of the replicate with ``seed`` (default: the run's)."""
        decoder = self.decoders.get(self.cfg.seed if seed is None else seed)
        mae = MAEPart(self.cfg.pretrain, decoder) if decoder is not None else None
        return RayTrainDistiller(self.cfg.model, self.cfg.data, f"{storage.uri}/train",
                                 scaling=self.cfg.distill.scaling(), callbacks=callbacks,
                                 precision=self.cfg.train.precision, mae=mae)

    def shutdown(self) -> None:
        """Stop the client actors."""
        if self.actors is not None:
            self.actors.shutdown()
            self.actors = None
