"""The experiment config tree: one frozen dataclass per section.

An experiment YAML holds these sections (every key optional, defaults below); unknown keys
are errors. ``umim run CONFIG.yaml section.key=value ...`` overrides any leaf.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from engine.config.loader import ConfigError, from_dict, to_dict
from engine.data.catalog import MISSION_DOMAINS, domain_catalog
from engine.nn.models import resolve_encoder
from strategies.distill import DistillSettings
from strategies.factory import resolve_strategy


def _positive(section: str, **values: float | int | None) -> None:
    """Raise ``ValueError`` naming ``section.key`` for every value that is not > 0."""
    bad = [k for k, v in values.items() if v is not None and not v > 0]
    if bad:
        raise ValueError(", ".join(f"{section}.{k} must be > 0" for k in bad))


def _non_negative(section: str, **values: float | int | None) -> None:
    """Raise ``ValueError`` naming ``section.key`` for every value that is < 0."""
    bad = [k for k, v in values.items() if v is not None and v < 0]
    if bad:
        raise ValueError(", ".join(f"{section}.{k} must be >= 0" for k in bad))


POOL_SOURCES = frozenset({"mednist"})
"""Sources whose images also feed the server's unlabelled pool."""


@dataclass(frozen=True)
class TrainScaling:
    """How a server-side Ray Train job is spread: ``num_workers`` DDP workers with
    ``cpus_per_worker`` CPUs each and, when ``use_gpu``, ``gpus_per_worker`` GPUs each
    (fractions share a device with the client actors)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0

    def check_scaling(self, knob: str) -> None:
        """Raise ``ValueError`` naming ``knob`` (the config section) for bad scaling."""
        if self.num_workers < 1:
            raise ValueError(f"{knob}.num_workers must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"{knob}.cpus_per_worker must be > 0")
        if self.use_gpu and not 0 < self.gpus_per_worker <= 8:
            raise ValueError(f"{knob}.gpus_per_worker must be in (0, 8]")

    def scaling(self) -> TrainScaling:
        """Just the scaling fields."""
        return TrainScaling(**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(TrainScaling)})


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
        Cap the server's unlabelled pool (seeded subsample; stratified by source when the
        pool has several, every source keeping at least one image).
    pool_share
        Share in ``[0, 1)`` of every client domain's official train split that moves into
        the server's unlabelled pool (images only), drawn per domain stratified by label
        with ``mednist_seed``; the domain's clients train on the rest (partitioned when
        ``clients_per_domain > 1``), val / test never change. ``0`` (default): the pool is
        the MedNIST half alone, the paper's setting.
    pool_sources
        Catalog domains, none of them in ``domains``, whose whole train split joins the pool
        unlabelled (e.g. other MedMNIST datasets added under ``extra_domains``).
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
    pool_share: float = 0.0
    pool_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("data.domains must name at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"data.domains has duplicates: {list(self.domains)}")
        if self.clients_per_domain < 1:
            raise ValueError("data.clients_per_domain must be >= 1")
        _positive("data", dirichlet_alpha=self.dirichlet_alpha,
                  max_train_samples=self.max_train_samples,
                  max_eval_samples=self.max_eval_samples, pool_size=self.pool_size)
        if not 0.0 <= self.pool_share < 1.0:
            raise ValueError(f"data.pool_share must be in [0, 1), got {self.pool_share}")
        if len(set(self.pool_sources)) != len(self.pool_sources):
            raise ValueError(f"data.pool_sources has duplicates: {list(self.pool_sources)}")
        clients = [d for d in self.pool_sources if d in self.domains]
        if clients:
            raise ValueError(f"data.pool_sources: {clients} are client domains (in "
                             "data.domains); a pool source gives all its train images to "
                             "the unlabelled pool, so it cannot also be a client")
        catalog = self.catalog()
        unknown = [d for d in self.domains if d not in catalog]
        if unknown:
            raise ValueError(f"data.domains: unknown domain(s) {unknown}; known: "
                             f"{list(catalog)} (add your own under data.extra_domains)")
        unknown = [d for d in self.pool_sources if d not in catalog]
        if unknown:
            raise ValueError(f"data.pool_sources: unknown domain(s) {unknown}; known: "
                             f"{list(catalog)} (add your own under data.extra_domains)")

    def catalog(self) -> dict[str, Any]:
        """The domain catalog of this experiment (built-ins plus ``extra_domains``)."""
        try:
            return domain_catalog(dict(self.extra_domains))
        except ValueError as err:
            raise ValueError(f"data.extra_domains: {err}") from err


@dataclass(frozen=True)
class ModelConfig:
    """The shared encoder (MONAI networks at 3 x 28 x 28) and the heads on top of it.

    ``arch`` is ``vit`` (MONAI ``ViT``, the MAE-compatible encoder), ``resnet18`` (MONAI
    ``ResNet`` with a 3x3 stride-1 stem and no max-pool), any encoder registered with
    ``umim.register_encoder``, an import path ``package.module:factory`` or an entry point
    of ``umim.encoders``. ``options`` are the encoder's own options (validated against the
    options dataclass it declares). The sizes below are the ViT's.
    """

    arch: str = "vit"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    patch_size: int = 4
    hidden_size: int = 192
    mlp_dim: int = 384
    num_layers: int = 6
    num_heads: int = 6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive("model", patch_size=self.patch_size, hidden_size=self.hidden_size,
                  mlp_dim=self.mlp_dim, num_layers=self.num_layers, num_heads=self.num_heads)
        if 28 % self.patch_size:
            raise ValueError(f"model.patch_size must divide 28, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be a multiple of model.num_heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be in [0, 1)")
        try:
            spec = resolve_encoder(self.arch)
        except ValueError as err:
            raise ValueError(f"model.arch: {err}") from err
        if spec.options is None and self.options:
            raise ValueError(f"model.options: encoder {self.arch!r} declares no options, "
                             f"got {sorted(self.options)}")
        if spec.options is not None:
            from_dict(spec.options, self.options, "model.options")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client: optimiser, schedule, numerics.

    ``precision`` is the experiment's one precision setting, honoured by the clients (fit,
    evaluation, fine-tuning), MIM pretraining, distillation and the benchmarks
    (:mod:`engine.nn.precision`): ``auto`` is bf16 autocast on CUDA and float32 on a CPU,
    ``bf16`` is bf16 autocast on any device (the CPU too), ``fp32`` is no autocast.

    The learning-rate schedule (:mod:`engine.nn.schedule`) spans one local-training call
    (``Client.fit``) and is stepped once per batch: in federated strategies that is one
    round's local epochs (it restarts every round); for ``local`` / ``centralised`` with
    ``strategy.rounds=1`` and many epochs, and for ``umim bench medmnist``, it is the whole
    training. The defaults (``constant``, no warm-up, no clipping) train exactly as without
    a schedule.

    Attributes
    ----------
    optimizer
        ``adamw`` (decoupled weight decay), ``adam`` (``torch.optim.Adam``, MedMNIST's
        optimiser; ``weight_decay`` is then an L2 term, set 0 for MedMNIST's recipe) or
        ``sgd`` (with ``momentum``).
    schedule
        ``constant``, ``step`` (times ``gamma`` at each of ``milestones``) or ``cosine``
        (half a cosine down towards 0 after the warm-up).
    warmup_epochs
        Linear warm-up over this many epochs of the call (any schedule); when it is as long
        as the call, the whole call is warm-up.
    milestones
        ``step``: fractions of the call's epochs, strictly increasing in (0, 1) (MedMNIST's
        recipe: x0.1 at 50 % and 75 %).
    gamma
        ``step``: the factor at each milestone, in (0, 1].
    grad_clip
        Clip the global gradient norm to this value before each step (``null``: no
        clipping).
    """

    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    schedule: Literal["constant", "step", "cosine"] = "constant"
    warmup_epochs: int = 0
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    grad_clip: float | None = None
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # images and convolution weights in channels-last memory order, on every device (about
    # 1.2-1.3x faster training of ResNet-18 and ViT on a 2-core AVX2 CPU, see
    # docs/performance.md); exported weights are always plain contiguous tensors
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("train.local_epochs and train.batch_size must be >= 1, lr > 0")
        _non_negative("train", weight_decay=self.weight_decay)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError("train.momentum must be in [0, 1)")
        if self.schedule not in ("constant", "step", "cosine"):
            raise ValueError(f"train.schedule must be one of ['constant', 'step', 'cosine'], "
                             f"got {self.schedule!r}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"train.optimizer must be one of ['adamw', 'adam', 'sgd'], "
                             f"got {self.optimizer!r}")
        _non_negative("train", warmup_epochs=self.warmup_epochs)
        _positive("train", grad_clip=self.grad_clip)
        milestones = tuple(float(m) for m in self.milestones)
        object.__setattr__(self, "milestones", milestones)  # a list from Python callers
        if any(not 0.0 < m < 1.0 for m in milestones):
            raise ValueError("train.milestones must be fractions of the epochs in (0, 1), "
                             f"got {list(milestones)}")
        if any(milestones[i + 1] <= milestones[i] for i in range(len(milestones) - 1)):
            raise ValueError(f"train.milestones must be strictly increasing, got "
                             f"{list(milestones)}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"train.gamma must be in (0, 1], got {self.gamma}")


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
    task_timeout_s
        How long one client call (fit, evaluate, fine-tune) may take before the client counts
        as hung: its actor is restarted and the call retried like a crash, then recorded as a
        ``timeout`` failure (``null``: no limit). Raise it for large models on CPUs.
    """

    num_actors: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 2
    max_retries: int = 2
    min_fit_fraction: float = 1.0
    ready_timeout_s: float = 300.0
    task_timeout_s: float | None = 3600.0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError("clients.num_actors must be >= 1")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError("clients.num_cpus must be > 0 and clients.num_gpus >= 0")
        if not 0.0 < self.min_fit_fraction <= 1.0:
            raise ValueError("clients.min_fit_fraction must be in (0, 1]")
        _non_negative("clients", max_restarts=self.max_restarts, max_retries=self.max_retries)
        _positive("clients", ready_timeout_s=self.ready_timeout_s,
                  task_timeout_s=self.task_timeout_s)


@dataclass(frozen=True)
class StrategyConfig:
    """Which strategy runs, its rounds, and its own options.

    In YAML the section is flat: ``name``, ``rounds`` and the keys of the strategy's
    ``Options`` dataclass side by side (``umim strategies`` lists each strategy's options)::

        strategy: {name: fedprox, rounds: 20, proximal_mu: 0.1}

    A key the named strategy does not declare is an error naming the strategy.

    Attributes
    ----------
    name
        A registered strategy (``universal``, ``fedavg``, ``fedprox``, ``local``,
        ``centralised``), or an import path ``package.module:Class``.
    rounds
        Rounds of the run, for strategies that do not plan their own (the universal
        strategy runs ``stages x rounds_per_stage`` rounds).
    options
        An instance of the strategy's ``Options`` dataclass.
    """

    name: str = "fedavg"
    rounds: int = 2
    options: Any = None

    COMMON = ("name", "rounds")

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("strategy.rounds must be >= 1")
        try:
            cls = resolve_strategy(self.name)
        except ValueError as err:
            raise ValueError(f"strategy.name: {err}") from err
        if self.options is None:
            object.__setattr__(self, "options", cls.Options())
        elif not isinstance(self.options, cls.Options):
            raise ValueError(f"strategy {self.name!r} takes {cls.Options.__name__} options, "
                             f"got {type(self.options).__name__}")

    @property
    def strategy_class(self) -> type:
        """The strategy class :attr:`name` resolves to."""
        return resolve_strategy(self.name)

    @classmethod
    def keys_for(cls, data: Mapping[str, Any]) -> list[str]:
        """The valid keys of a section naming ``data["name"]`` (common keys, then options)."""
        strategy = resolve_strategy(str(data.get("name", cls.name)))
        return [*cls.COMMON, *(f.name for f in dataclasses.fields(strategy.Options))]

    @classmethod
    def from_config(cls, data: Mapping[str, Any], where: str = "strategy") -> StrategyConfig:
        """Build from the flat YAML form (see the class docstring)."""
        data = dict(data)
        name = data.pop("name", cls.name)
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected a string, got {name!r}")
        rounds = data.pop("rounds", cls.rounds)
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise ConfigError(f"{where}.rounds: expected an integer, got {rounds!r}")
        try:
            strategy = resolve_strategy(name)
        except ValueError as err:
            raise ConfigError(f"{where}.name: {err}") from err
        valid = [f.name for f in dataclasses.fields(strategy.Options)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"{[f'{where}.{k}' for k in unknown]}: not option(s) of strategy "
                              f"{name!r}; its options: {valid}, common keys: "
                              f"{list(cls.COMMON)}")
        options = from_dict(strategy.Options, data, where)
        try:
            return cls(name=name, rounds=rounds, options=options)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def to_config(self) -> dict[str, Any]:
        """The flat YAML form."""
        return {"name": self.name, "rounds": self.rounds, **to_dict(self.options)}

    def with_strategy(self, name: str, rounds: int | None = None,
                      options: Mapping[str, Any] | None = None) -> StrategyConfig:
        """Another strategy (its own options from ``options``, else its defaults)."""
        return StrategyConfig.from_config({"name": name, "rounds": rounds or self.rounds,
                                           **dict(options or {})})


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
        _positive("pretrain", lr=self.lr, decoder_hidden_size=self.decoder_hidden_size,
                  decoder_mlp_dim=self.decoder_mlp_dim,
                  decoder_num_layers=self.decoder_num_layers,
                  decoder_num_heads=self.decoder_num_heads)
        _non_negative("pretrain", weight_decay=self.weight_decay)
        if self.decoder_hidden_size % self.decoder_num_heads:
            raise ValueError("pretrain.decoder_hidden_size must be a multiple of "
                             "pretrain.decoder_num_heads")


@dataclass(frozen=True)
class DistillConfig(DistillSettings, TrainScaling):
    """The ``distill`` section: the objective and its stopping rule
    (:class:`~strategies.distill.DistillSettings`, handed to strategies) plus how the Ray
    Train job is spread (:class:`TrainScaling`, the engine's alone)."""

    def __post_init__(self) -> None:
        DistillSettings.__post_init__(self)
        self.check_scaling("distill")
        _positive("distill", lr=self.lr, batch_size=self.batch_size)
        _non_negative("distill", weight_decay=self.weight_decay)

    def objective(self) -> DistillSettings:
        """Just the objective's settings (what a strategy receives)."""
        return DistillSettings(**{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(DistillSettings)})


ENCODER_ARMS = ("random", "base", "main", "merged")
"""The encoders the evaluations compare: ``random`` (a random initialisation), ``base`` (the
pretrained base, ``mim`` or ``random-init``), ``main`` (the main run's global encoder, e.g.
``universal``) and ``merged`` (the weight average of every client's encoder fine-tuned once
from the base); besides these, the name of any baseline (e.g. ``fedavg``) judges that
baseline's global encoder."""
EVAL_MODES = ("finetune", "linear_probe", "knn")
"""How an encoder is judged at each client: full fine-tuning, a linear head on frozen
features, or k-nearest neighbours on frozen features."""


@dataclass(frozen=True)
class PrimaryComparison:
    """The pre-registered comparison the verdict is about: encoder ``a`` better than ``b``
    in ``mode`` at ``label_fraction`` on ``metric`` by the one-sided ``test`` (Wilcoxon
    signed-rank or paired t) over ``unit`` (``units``: (domain, replicate) pairs, each
    replicate an independent pipeline; ``domains``: per-domain means over replicates),
    Holm-corrected across every comparison the study reports on that metric."""

    a: str = "main"
    b: str = "base"
    mode: str = "finetune"
    label_fraction: float = 1.0
    metric: Literal["auc", "acc"] = "auc"
    test: Literal["wilcoxon", "ttest"] = "wilcoxon"
    unit: Literal["units", "domains"] = "units"


@dataclass(frozen=True)
class EvaluationConfig:
    """What is measured after the main run (all federated: clients return metrics only).

    Attributes
    ----------
    replicates
        Independent whole pipelines (base pretraining, main run, evaluations, baselines),
        replicate ``r`` with seed ``seed + r``; statistics treat (domain, replicate) as the
        unit and domains as the top level of a hierarchical bootstrap.
    encoders
        Encoders every evaluation mode judges (see :data:`ENCODER_ARMS`; a baseline's name
        judges its global encoder).
    modes
        Evaluation modes (see :data:`EVAL_MODES`).
    label_fractions
        Fractions of each client's train split that are labelled for the evaluations
        (few-shot; a fixed stratified subset per replicate, nested across fractions).
    finetune_epochs
        Epochs of downstream fine-tuning (the same for every encoder); 0 skips every mode.
    probe_epochs
        Epochs of the linear probe's head training on frozen features.
    knn_k
        Neighbours of the k-NN evaluation.
    seeds
        Fine-tuning seeds within a replicate (averaged within the unit).
    primary
        The pre-registered primary comparison (:class:`PrimaryComparison`).
    select_round
        Which round's model a federated arm reports: ``last``, or ``best_val`` (the round
        with the best mean federated val AUC among those that score every domain); the
        same rule for every arm.
    split
        The split every reported number is scored on: ``test`` (the report), or ``val`` to
        tune a recipe without touching test (selection then also uses val: a tuning run,
        never a result).
    equal_budgets
        Give every baseline the main run's client-epoch budget (its rounds derived from
        it); a budget that cannot match is an error. ``false`` allows unequal budgets on
        purpose (``baseline_rounds``).
    lodo_domains
        Leave-one-domain-out: for each, a global model is distilled without it and the
        held-out domain is judged from it vs from the base. A domain whose images share a
        source with the server's unlabelled pool (MedNIST) is refused: held out, MIM and
        distillation would still see it.
    baselines
        Strategies run on the same data and base for the comparison table, e.g.
        ``[fedavg, fedprox, local, centralised]``.
    baseline_rounds
        Rounds of each baseline (``None``: derived from the main run's budget; with
        ``equal_budgets: false`` and no whole number of rounds matching it,
        ``strategy.rounds``).
    baseline_seeds
        Seeds of each baseline within a single replicate (``None``: the replicate's seed).
    baseline_options
        Per-baseline strategy options.
    """

    replicates: int = 1
    encoders: tuple[str, ...] = ("main", "base")
    modes: tuple[str, ...] = ("finetune",)
    label_fractions: tuple[float, ...] = (1.0,)
    finetune_epochs: int = 0
    probe_epochs: int = 30
    knn_k: int = 11
    seeds: tuple[int, ...] = (0, 1, 2)
    primary: PrimaryComparison = field(default_factory=PrimaryComparison)
    select_round: Literal["last", "best_val"] = "last"
    split: Literal["test", "val"] = "test"
    equal_budgets: bool = True
    lodo_domains: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()
    baseline_rounds: int | None = None
    baseline_seeds: tuple[int, ...] | None = None
    baseline_options: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        _non_negative("evaluation", finetune_epochs=self.finetune_epochs)
        _positive("evaluation", baseline_rounds=self.baseline_rounds,
                  replicates=self.replicates, probe_epochs=self.probe_epochs,
                  knn_k=self.knn_k)
        for key in ("seeds", "lodo_domains", "baselines", "encoders", "modes",
                    "label_fractions"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"evaluation.{key} has duplicates: {list(values)}")
        for key, known in (("encoders", (*ENCODER_ARMS, *self.baselines)),
                           ("modes", EVAL_MODES)):
            bad = [v for v in getattr(self, key) if v not in known]
            if bad:
                raise ValueError(f"evaluation.{key}: unknown {bad}; known: {list(known)}"
                                 + (" (or a name of evaluation.baselines)"
                                    if key == "encoders" else ""))
        if not self.encoders or not self.modes or not self.label_fractions:
            raise ValueError("evaluation.encoders, modes and label_fractions may not be empty")
        bad = [f for f in self.label_fractions if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"evaluation.label_fractions must be in (0, 1], got {bad}")
        if self.finetune_epochs > 0 and not self.seeds:
            raise ValueError("evaluation.seeds may not be empty when finetune_epochs > 0")
        self._check_primary()
        if self.replicates > 1 and self.baseline_seeds:
            raise ValueError("evaluation.baseline_seeds re-seeds baselines within one "
                             "replicate; with evaluation.replicates > 1 every baseline "
                             "already runs once per replicate: drop baseline_seeds")
        for name in self.baselines:
            try:
                resolve_strategy(name)
            except ValueError as err:
                raise ValueError(f"evaluation.baselines: {err}") from err
        extra = sorted(set(self.baseline_options) - set(self.baselines))
        if extra:
            raise ValueError(f"evaluation.baseline_options names strategies that are not "
                             f"baselines: {extra}")

    def _check_primary(self) -> None:
        p = self.primary
        if self.finetune_epochs == 0:
            return  # no evaluation runs: the primary is about nothing
        problems = [f"evaluation.primary.{k}={getattr(p, k)!r} is not in evaluation.{key} "
                    f"{list(getattr(self, key))}"
                    for k, key in (("a", "encoders"), ("b", "encoders"), ("mode", "modes"),
                                   ("label_fraction", "label_fractions"))
                    if getattr(p, k) not in getattr(self, key)]
        if p.a == p.b:
            problems.append("evaluation.primary compares an encoder with itself")
        if problems:
            raise ValueError("; ".join(problems))

    def baseline_strategy(self, name: str, rounds: int) -> StrategyConfig:
        """The strategy section of baseline ``name`` (its ``baseline_options``, else its
        defaults)."""
        return StrategyConfig.from_config({"name": name, "rounds": rounds,
                                           **dict(self.baseline_options.get(name, {}))},
                                          f"evaluation.baseline_options.{name}")


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy of client training (DP-SGD with Opacus).

    Off by default; its fields are filled by the DP work (issue 13).
    """


@dataclass(frozen=True)
class PrivacyConfig:
    """What leaves a client, and under which guarantee.

    ``transfer``: ``weights`` (the client returns its fine-tuned model; the paper's setting)
    or ``predictions`` (the teacher stays home: the client returns its outputs on the public
    pool only). ``dp``: DP-SGD for client training (:class:`DPConfig`).
    """

    transfer: Literal["weights", "predictions"] = "weights"
    dp: DPConfig = field(default_factory=DPConfig)


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

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("run.checkpoint_every and run.keep_checkpoints must be >= 1")
        _non_negative("run", evaluate_every=self.evaluate_every)
        if not self.storage_path:
            raise ValueError("run.storage_path may not be empty")


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
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '.', '_' or '-' "
                             "(it names the run's folder)")
        stages = getattr(self.strategy.options, "stages", ())
        unknown = [d for stage in stages for d in stage if d not in self.data.domains]
        if unknown:
            raise ValueError(f"strategy.stages name domains that are not in data.domains: "
                             f"{unknown}")
        unknown = [d for d in self.evaluation.lodo_domains if d not in self.data.domains]
        if unknown:
            raise ValueError(f"evaluation.lodo_domains name domains that are not in "
                             f"data.domains: {unknown}")
        if self.evaluation.lodo_domains and self.data.pool_share > 0:
            raise ValueError(f"evaluation.lodo_domains: with data.pool_share="
                             f"{self.data.pool_share} every client domain gives images to the "
                             f"server's unlabelled pool, so a held-out domain would still be "
                             f"seen by MIM and distillation; LODO needs data.pool_share=0")
        catalog = self.data.catalog()
        shared = [d for d in self.evaluation.lodo_domains
                  if catalog[d].source in POOL_SOURCES]
        if shared:
            raise ValueError(f"evaluation.lodo_domains: {shared} take their images from "
                             f"MedNIST, as does the server's unlabelled pool (the other half "
                             f"of the same classes, used by MIM and distillation): held out, "
                             f"they would still be seen, so the test would not be out of "
                             f"domain; hold out a domain of another source")
        try:  # the strategy's own plan must hold for these domains (e.g. stages)
            self.strategy.strategy_class.planned_rounds(self.strategy.options,
                                                        self.data.domains, self.strategy.rounds)
        except ValueError as err:
            raise ValueError(f"strategy: {err}") from err
        if self.pretrain.method == "mim" and self.model.arch != "vit":
            raise ValueError("pretrain.method=mim needs model.arch=vit (MONAI's MAE is a ViT); "
                             f"got model.arch={self.model.arch!r}")
        for name in self.evaluation.baselines:
            self.baseline_rounds(name)  # every baseline's budget must match (or be allowed)

    # -- what the experiment needs, from what its strategies declare ------------------------
    def strategy_classes(self) -> list[type]:
        """The classes of the main strategy and of every baseline."""
        return [self.strategy.strategy_class,
                *(resolve_strategy(name) for name in self.evaluation.baselines)]

    @property
    def needs_pooled_client(self) -> bool:
        """Whether a strategy that runs declares ``pooled`` (the engine starts the pooled
        oracle client for it)."""
        return any(cls.pooled for cls in self.strategy_classes())

    @property
    def runs_train_jobs(self) -> bool:
        """Whether the experiment runs Ray Train jobs: MIM pretraining, a strategy that
        declares ``distils``, or leave-one-domain-out distillations."""
        return self.pretrain.method != "none" or self.runs_distillations

    @property
    def runs_distillations(self) -> bool:
        """Whether distillation Train jobs run: a strategy declares ``distils``, or LODO."""
        return bool(self.evaluation.lodo_domains) or any(
            cls.distils for cls in self.strategy_classes())

    def planned_rounds(self) -> int:
        """Rounds of the main run, as its strategy plans them."""
        return self.strategy.strategy_class.planned_rounds(
            self.strategy.options, self.data.domains, self.strategy.rounds)

    # -- budgets ---------------------------------------------------------------------------
    def budget(self) -> int:
        """The main run's budget: epochs each client trains over the whole run."""
        return self.strategy.strategy_class.client_epochs(
            self.strategy.options, self.data.domains, self.strategy.rounds,
            self.train.local_epochs)

    def baseline_rounds(self, name: str) -> int:
        """Rounds of baseline ``name``: ``evaluation.baseline_rounds`` if set, else the
        rounds that give it the main run's budget; unequal budgets are errors unless
        ``evaluation.equal_budgets`` is false."""
        ev = self.evaluation
        cls = resolve_strategy(name)
        options = ev.baseline_strategy(name, 1).options
        budget = self.budget()
        if ev.baseline_rounds is not None:
            rounds = ev.baseline_rounds
            got = cls.client_epochs(options, self.data.domains, rounds,
                                    self.train.local_epochs)
            if ev.equal_budgets and got != budget:
                raise ValueError(
                    f"evaluation.baseline_rounds={rounds} gives baseline {name!r} {got} "
                    f"client epochs, the main run ({self.strategy.name}) {budget}: budgets "
                    f"must be equal (drop baseline_rounds to derive them, or set "
                    f"evaluation.equal_budgets=false to compare unequal budgets on purpose)")
            return rounds
        rounds = cls.rounds_for_budget(options, self.data.domains, budget,
                                       self.train.local_epochs)
        if rounds is None and ev.equal_budgets:
            own = cls.client_epochs(options, self.data.domains, 1, self.train.local_epochs)
            if own == cls.client_epochs(options, self.data.domains, 2,
                                        self.train.local_epochs):  # plans its own rounds
                raise ValueError(
                    f"evaluation.baselines: {name!r} plans its own rounds and trains {own} "
                    f"client epochs with its options, the main run ({self.strategy.name}) "
                    f"{budget}: match them in evaluation.baseline_options.{name} (or set "
                    f"evaluation.equal_budgets=false)")
            per_round = cls.epochs_per_round(options, self.train.local_epochs)
            raise ValueError(
                f"evaluation.baselines: no whole number of rounds gives {name!r} the main "
                f"run's budget of {budget} client epochs ({per_round} per round); set "
                f"train.local_epochs to a divisor of {budget}")
        return rounds if rounds is not None else self.strategy.rounds

    def budgets(self) -> dict[str, int]:
        """Client epochs of the main run and of every baseline (written in the summary)."""
        out = {self.strategy.name: self.budget()}
        for name in self.evaluation.baselines:
            cls = resolve_strategy(name)
            out[name] = cls.client_epochs(self.evaluation.baseline_strategy(name, 1).options,
                                          self.data.domains, self.baseline_rounds(name),
                                          self.train.local_epochs)
        return out
