"""The experiment config tree: one frozen dataclass per section.

An experiment YAML holds these sections (every key optional, defaults below); unknown keys
are errors. ``umim run CONFIG.yaml section.key=value ...`` overrides any leaf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from engine.data.catalog import MISSION_DOMAINS
from strategies.distill import DistillSettings, TrainScaling


@dataclass(frozen=True)
class DataConfig:
    """Which domains take part and how their data is cut.

    Attributes
    ----------
    domains
        Client domains (names from the catalog), one client each unless partitioned.
    extra_domains
        Additional catalog entries, in the format of ``engine/data/domains.yaml``.
    data_root, cache_dir
        Raw data and derived-shard folders (``None``: resolved from the environment).
    download
        Fetch missing official files.
    mednist_seed
        Seed of the MedNIST pool / client split.
    clients_per_domain
        Split each domain over this many clients (``partition`` scheme).
    partition
        ``iid`` or ``dirichlet`` label skew, when ``clients_per_domain > 1``.
    dirichlet_alpha
        Concentration of the Dirichlet split.
    max_train_samples, max_eval_samples
        Cap every client's train / val and test split (seeded subsample) for quick runs.
    pool_size
        Cap the server's unlabelled pool (seeded subsample).
    """

    domains: tuple[str, ...] = MISSION_DOMAINS
    extra_domains: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda:
                                                           MappingProxyType({}))
    data_root: str | None = None
    cache_dir: str | None = None
    download: bool = True
    mednist_seed: int = 0
    clients_per_domain: int = 1
    partition: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    pool_size: int | None = None

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("data.domains must name at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"data.domains has duplicates: {list(self.domains)}")
        if self.clients_per_domain < 1:
            raise ValueError("data.clients_per_domain must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """The shared encoder (MONAI networks at 3 x 28 x 28) and the heads on top of it.

    ``arch`` is ``vit`` (MONAI ``ViT``, the MAE-compatible encoder) or ``resnet18``
    (MONAI ``ResNet`` with a 3x3 stride-1 stem and no max-pool).
    """

    arch: Literal["vit", "resnet18"] = "vit"
    patch_size: int = 4
    hidden_size: int = 192
    mlp_dim: int = 384
    num_layers: int = 6
    num_heads: int = 6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if 28 % self.patch_size:
            raise ValueError(f"model.patch_size must divide 28, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be a multiple of model.num_heads")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client: optimiser, schedule, numerics."""

    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # images and convolution weights in channels-last memory order, on every device (about
    # 1.2-1.3x faster training of ResNet-18 and ViT on a 2-core AVX2 CPU, see
    # docs/performance.md); exported weights are always plain contiguous tensors
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("train.local_epochs and train.batch_size must be >= 1, lr > 0")


@dataclass(frozen=True)
class ClientsConfig:
    """How client actors are placed on the cluster.

    Attributes
    ----------
    num_actors
        Actors that serve the clients (``None``: one per client). Fewer actors than
        clients means several virtual clients share an actor.
    num_cpus, num_gpus
        Resources of each actor; fractional ``num_gpus`` packs several on one GPU.
    max_restarts
        Times Ray restarts a crashed actor.
    max_retries
        Times a failed client task is retried (after a restart) before it counts as failed.
    min_fit_fraction
        Fraction of the selected clients that must return a valid update for a round to
        count; below it the run stops with an error.
    ready_timeout_s
        How long to wait for all actors to start (fails instead of hanging on placement).
    """

    num_actors: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 2
    max_retries: int = 2
    min_fit_fraction: float = 1.0
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError("clients.num_actors must be >= 1")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError("clients.num_cpus must be > 0 and clients.num_gpus >= 0")
        if not 0.0 < self.min_fit_fraction <= 1.0:
            raise ValueError("clients.min_fit_fraction must be in (0, 1]")


@dataclass(frozen=True)
class StrategyConfig:
    """Which strategy runs and its schedule.

    ``name`` is one of the registered strategies (``umim strategies`` lists them):
    ``universal``, ``fedavg``, ``fedprox``, ``local``, ``centralised``.

    Attributes
    ----------
    rounds
        Rounds of the FL strategies (the universal strategy runs
        ``stages x rounds_per_stage`` rounds instead).
    proximal_mu
        FedProx's proximal weight.
    stages
        Universal: explicit domain lists, one per stage (e.g. ``[[breast, retina], [...]]``);
        empty means ``num_stages`` consecutive chunks of ``data.domains``.
    num_stages, rounds_per_stage
        Universal: how many stages, and rounds (fine-tune + distil) within each.
    local_epochs
        Universal: epochs of local fine-tuning per round (``None``: ``train.local_epochs``).
    select_on_val
        Universal: clients keep the epoch with the best private val AUC.
    """

    name: str = "fedavg"
    rounds: int = 2
    proximal_mu: float = 0.01
    stages: tuple[tuple[str, ...], ...] = ()
    num_stages: int = 2
    rounds_per_stage: int = 1
    local_epochs: int | None = None
    select_on_val: bool = True

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.num_stages < 1 or self.rounds_per_stage < 1:
            raise ValueError("strategy.rounds, num_stages and rounds_per_stage must be >= 1")


@dataclass(frozen=True)
class PretrainConfig(TrainScaling):
    """The server's base encoder: random (``none``) or masked image modelling (``mim``).

    The MAE (MONAI ``MaskedAutoEncoderViT``) uses the encoder sizes of ``model``; its
    decoder is sized here. A base with the same settings and pool is trained once and
    reused from the cache by every later experiment.
    """

    method: Literal["none", "mim"] = "none"
    mask_ratio: float = 0.75
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    decoder_hidden_size: int = 64
    decoder_mlp_dim: int = 128
    decoder_num_layers: int = 2
    decoder_num_heads: int = 4

    def __post_init__(self) -> None:
        self.check_scaling("pretrain")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError("pretrain.mask_ratio must be in (0, 1)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("pretrain.epochs and batch_size must be >= 1")


@dataclass(frozen=True)
class EvaluationConfig:
    """What is measured after the main run (all federated: clients return metrics only).

    Attributes
    ----------
    finetune_epochs
        Budget of downstream fine-tuning, the same from the global encoder and from the
        MIM base (the paper's baseline); 0 skips it.
    seeds
        Seeds of the downstream fine-tuning (paired over domains x seeds).
    lodo_domains
        Leave-one-domain-out: for each, a global model is distilled without it and the
        held-out domain is fine-tuned from it vs from the MIM base.
    baselines
        Strategies run on the same data and base for the comparison table, e.g.
        ``[fedavg, fedprox, local, centralised]``.
    baseline_rounds
        Rounds of each baseline (``None``: ``strategy.rounds``).
    baseline_seeds
        Seeds of each baseline (``None``: just ``seed``).
    """

    finetune_epochs: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    lodo_domains: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    baseline_rounds: int | None = None
    baseline_seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RunConfig:
    """Where results go and how the run is checkpointed.

    ``cache_fits`` reuses client updates across runs when the instruction, client, data
    and settings are identical (see :mod:`engine.fl.fitcache`); sweeps turn it on.
    ``evaluate_every`` runs the federated validation every that many rounds (0: never; the
    final test evaluation always runs).
    ``dashboard`` starts Ray's dashboard with a local Ray (``None``: only when the experiment
    runs Ray Train jobs, whose placement-group cleanup queries the State API the dashboard
    serves; it costs a few seconds of start-up on a small machine). It does not apply when
    joining a running cluster.
    """

    storage_path: str = "runs"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    address: str | None = None
    cache_fits: bool = False
    evaluate_every: int = 1
    dashboard: bool | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: every section of the tree."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    distill: DistillSettings = field(default_factory=DistillSettings)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        unknown = [d for stage in self.strategy.stages for d in stage
                   if d not in self.data.domains]
        unknown += [d for d in self.evaluation.lodo_domains if d not in self.data.domains]
        if unknown:
            raise ValueError(f"strategy.stages / evaluation.lodo_domains name domains that are "
                             f"not in data.domains: {unknown}")
