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
from engine.nn.augment import parse_augment
from engine.nn.models import resolve_encoder
from strategies.distill import DistillSettings
from strategies.factory import resolve_strategy
from strategies.sampling import ClientSampling


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


def _build_augment(cls: type, options: Mapping[str, Any], where: str) -> Any:
    """An augmentation's options from its YAML keys (unknown keys and bad values raise a
    one-line ``ConfigError`` naming ``where``)."""
    return from_dict(cls, options, where)


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

    ``domain_arch`` maps a domain to the encoder family its clients train their teachers in
    when a hospital keeps its own (e.g. ``{pathology: resnet18}``; names as for ``arch``,
    checked against the registry, with that encoder's default options and the sizes below);
    for a strategy that declares ``heterogeneous`` (``universal``) such a client trains a
    fresh model of its family each round instead of the global encoder, and the server
    builds its teacher in that family (``privacy.transfer: weights``) or uses only its
    outputs on the pool (``predictions``). The global model, every evaluation of it and
    every other strategy keep ``arch``. Empty (the default): every client trains ``arch``.
    """

    arch: str = "vit"
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    patch_size: int = 4
    hidden_size: int = 192
    mlp_dim: int = 384
    num_layers: int = 6
    num_heads: int = 6
    dropout: float = 0.0
    domain_arch: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        _positive("model", patch_size=self.patch_size, hidden_size=self.hidden_size,
                  mlp_dim=self.mlp_dim, num_layers=self.num_layers, num_heads=self.num_heads)
        if 28 % self.patch_size:
            raise ValueError(f"model.patch_size must divide 28, got {self.patch_size}")
        if self.arch in ("vit", "vit_conv") and self.hidden_size % self.num_heads:
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
        for domain, arch in self.domain_arch.items():
            if not isinstance(arch, str):
                raise ValueError(f"model.domain_arch.{domain} must be an encoder name, got "
                                 f"{arch!r}")
            try:
                other = resolve_encoder(arch)
            except ValueError as err:
                raise ValueError(f"model.domain_arch.{domain}: {err}") from err
            if other.options is not None and arch != self.arch:
                from_dict(other.options, {}, f"model.domain_arch.{domain}")

    def own_arch(self, domains: tuple[str, ...] | list[str]) -> str | None:
        """The encoder family a client of ``domains`` trains its teacher in when it is not
        ``arch`` (``domain_arch``; a client of several domains: only when they all name the
        same one), else ``None``."""
        archs = {self.domain_arch.get(d, self.arch) for d in domains}
        arch = archs.pop() if len(archs) == 1 else self.arch
        return None if arch == self.arch else arch

    def for_arch(self, arch: str | None) -> ModelConfig:
        """This config building encoder family ``arch`` (``None`` or ``arch``: itself; another
        family takes its default options)."""
        if arch is None or arch == self.arch:
            return self
        return dataclasses.replace(self, arch=arch, options=MappingProxyType({}),
                                   domain_arch=MappingProxyType({}))


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client: optimiser, schedule, numerics.

    ``precision`` is the experiment's one precision setting, honoured by the clients (fit,
    evaluation, fine-tuning), MIM pretraining, distillation and the benchmarks
    (:mod:`engine.nn.precision`): ``auto`` is bf16 autocast on CUDA and float32 on a CPU,
    ``bf16`` is bf16 autocast on any device (the CPU too), ``fp32`` is no autocast, ``fp16``
    is float16 autocast with a loss scaler (``torch.amp.GradScaler``) on CUDA only: refused
    at load when the clients (``clients.num_gpus``), MIM pretraining or distillation
    (``pretrain.use_gpu``, ``distill.use_gpu``) would run it on a CPU, and by a client
    that finds no GPU.

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
    augment
        Data augmentation of every training batch of a client (:mod:`engine.nn.augment`:
        MONAI's random transforms, on the client's device, seeded by the fit): a list of
        names (``flip``, ``rotate``, ``intensity``, ``shift``, ``noise``) or of mappings
        ``{name: rotate, prob: 0.5, degrees: 15}`` with that augmentation's options,
        applied in order. Empty (the default): no augmentation, training as before.
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    augment: tuple[Any, ...] = ()
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
        object.__setattr__(self, "augment", tuple(
            parse_augment(item, f"train.augment[{i}]", _build_augment)
            for i, item in enumerate(self.augment)))


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
        ``timeout`` failure (``null``: no limit). Raise it for large models on CPUs. With
        ``dispatch: actor`` one call is an actor's whole share of the round.
    dispatch
        ``client`` (default): one Ray task per client and round. ``actor``: one task per
        actor and round carrying all of its clients of that round, which it trains in turn
        (cross-device runs: thousands of small updates, where a task per update costs more
        than the update). The same results; a crash or hang retries the actor's share.
    fused_clients
        With ``dispatch: actor``: train up to this many of an actor's clients of a round at
        once, in one fused step (stacked parameters under ``torch.func.vmap``,
        :mod:`engine.fl.fused_fit`), when their fits are alike and simple enough (one
        domain, no schedule, DP-SGD, epoch selection, pool outputs, fp16, BatchNorm or
        dropout); the same results as one by one, to float rounding. A fit that cannot
        join is trained alone (its ``fused`` metric is 0). ``0`` (default): off.
    """

    num_actors: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 2
    max_retries: int = 2
    min_fit_fraction: float = 1.0
    ready_timeout_s: float = 300.0
    task_timeout_s: float | None = 3600.0
    dispatch: str = "client"
    fused_clients: int = 0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError("clients.num_actors must be >= 1")
        if self.dispatch not in ("client", "actor"):
            raise ValueError(f"clients.dispatch must be 'client' or 'actor', got "
                             f"{self.dispatch!r}")
        if self.fused_clients < 0:
            raise ValueError("clients.fused_clients must be >= 0")
        if self.fused_clients > 1 and self.dispatch != "actor":
            raise ValueError("clients.fused_clients needs clients.dispatch=actor (an actor "
                             "fuses the clients of one task)")
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
    fraction_fit, min_fit_clients
        Client sampling (cross-device): each training round trains
        ``max(min_fit_clients, ceil(fraction_fit * n))`` of its ``n`` candidate clients
        (a stage's clients for the universal strategy), drawn by
        :func:`strategies.sampling.sample_clients`, seeded by the run seed and the round (a
        resumed run samples the same clients). Default ``1.0`` / ``0``: every client, every
        round.
    fraction_evaluate, min_evaluate_clients
        The same for the per-round federated val evaluations; the final evaluation scores
        every client.
    """

    name: str = "fedavg"
    rounds: int = 2
    options: Any = None
    fraction_fit: float = 1.0
    min_fit_clients: int = 0
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 0

    COMMON = ("name", "rounds", "fraction_fit", "min_fit_clients", "fraction_evaluate",
              "min_evaluate_clients")
    SAMPLING = COMMON[2:]

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("strategy.rounds must be >= 1")
        self.sampling()  # checks the ranges
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

    def sampling(self) -> ClientSampling:
        """The per-round client sampling of these keys."""
        return ClientSampling(**{k: getattr(self, k) for k in self.SAMPLING})

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
        sampling = {}
        for key in cls.SAMPLING:
            if key not in data:
                continue
            value = data.pop(key)
            number = key.startswith("fraction")
            if isinstance(value, bool) or not isinstance(value, (int, float) if number
                                                         else int):
                raise ConfigError(f"{where}.{key}: expected "
                                  f"{'a number' if number else 'an integer'}, got {value!r}")
            sampling[key] = float(value) if number else value
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
            return cls(name=name, rounds=rounds, options=options, **sampling)
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def to_config(self) -> dict[str, Any]:
        """The flat YAML form."""
        return {"name": self.name, "rounds": self.rounds,
                **{k: getattr(self, k) for k in self.SAMPLING}, **to_dict(self.options)}

    def with_strategy(self, name: str, rounds: int | None = None,
                      options: Mapping[str, Any] | None = None) -> StrategyConfig:
        """Another strategy (its own options from ``options``, else its defaults), sampling
        clients as this one does."""
        return StrategyConfig.from_config({"name": name, "rounds": rounds or self.rounds,
                                           **{k: getattr(self, k) for k in self.SAMPLING},
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
    privacy_audit
        Run the membership-inference audit after the evaluations (step ``audit``): every
        client attacks, on its own data, each model that left it or that the server
        released (its teacher, the main run's global model, every baseline's), with the
        loss-threshold attack, members its train split and non-members its held-out
        ``split`` (:mod:`engine.fl.audit`); only the attack's AUC, TPR at 1% FPR and
        advantage come back. Off: no audit, nothing kept.
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
    privacy_audit: bool = False

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
    """Differential privacy of client training (DP-SGD with Opacus; :mod:`engine.fl.dpsgd`).

    Off by default (training is then exactly as without this section). On, every client's
    federated training (``Client.fit`` in the main run and in each baseline, every round)
    is DP-SGD: Poisson-sampled batches (rate ``train.batch_size / n`` of its ``n`` train
    images), each sample's gradient clipped to ``max_grad_norm``, Gaussian noise added;
    each client's accountant composes all its steps of the run. The guarantee is about the
    membership of one train image of a client in everything that client releases (its
    weights or predictions, and so the server's models, which are post-processing of them
    and of public data). Evaluation fine-tuning at a client (metrics only, nothing leaves
    but scores) is not DP. Each run of a study (main, each baseline) is accounted on its
    own.

    Attributes
    ----------
    enabled
        Train clients with DP-SGD.
    epsilon
        Target epsilon per client over the whole run, > 0.
    delta
        Target delta per client, in (0, 1) (``None``: ``1 / (10 n)`` of the client's ``n``
        train images).
    max_grad_norm
        Per-sample gradient clipping norm, > 0.
    accountant
        Opacus's accountant: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables,
        tighter).
    noise_multiplier
        Noise standard deviation over ``max_grad_norm``, >= 0: given, it is used and only
        accounted (the run fails before training when its planned steps would spend more
        than ``epsilon``); ``None``: Opacus's ``get_noise_multiplier`` for ``epsilon`` over
        the client's planned steps of the run (``ExperimentConfig.budget()`` epochs of
        ``int(n / batch_size)`` steps).
    """

    enabled: bool = False
    epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"privacy.dp.enabled must be true or false, got {self.enabled!r}")
        _positive("privacy.dp", epsilon=self.epsilon, max_grad_norm=self.max_grad_norm)
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ValueError(f"privacy.dp.delta must be in (0, 1) or null, got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"privacy.dp.accountant must be 'rdp' or 'prv', got "
                             f"{self.accountant!r}")
        _non_negative("privacy.dp", noise_multiplier=self.noise_multiplier)


@dataclass(frozen=True)
class PrivacyConfig:
    """What leaves a client, and under which guarantee.

    ``transfer``: ``weights`` (the client returns its fine-tuned model; the paper's setting)
    or ``predictions`` (the teacher stays home: the client returns its outputs on the public
    pool only). ``dp``: DP-SGD for client training (:class:`DPConfig`).

    ``predictions`` needs a strategy that declares ``predicts`` (``universal``), for the
    main run and every baseline, and refuses, at load, what would need a teacher's weights
    or network on the server: ``distill.augment`` and ``distill.mixup_alpha > 0`` (the
    teachers would have to see each batch's random view; their outputs are computed once, on
    the plain pool images), ``strategy.student_init: merged`` and the ``merged`` arm of
    ``evaluation.encoders`` (weight averages of the teachers) and
    ``evaluation.lodo_domains`` (its distillations use teachers fine-tuned as weights).
    Federated evaluation and fine-tuning still send the *global* model to the clients; only
    metrics come back.
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

    ``tracking`` logs the run to an experiment tracker as well as to its own folder:
    ``none`` (default) or ``mlflow`` (:mod:`engine.run.tracking`: one MLflow run per
    experiment with a nested run per step, the resolved config as params, every round's
    metrics per domain, the final test metrics and the report as artefacts).
    ``tracking_uri`` is the MLflow tracking URI (a server ``http://host:5000`` or a database
    ``sqlite:///path/mlflow.db``; ``None``: ``sqlite:///<run dir>/mlflow.db``, a store inside
    the run folder, which needs a local run folder). ``tracking_experiment`` names the MLflow
    experiment (``None``: the experiment's ``name``).
    """

    storage_path: str = "runs"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    address: str | None = None
    cache_fits: bool = False
    evaluate_every: int = 1
    dashboard: bool | None = None
    tracking: Literal["none", "mlflow"] = "none"
    tracking_uri: str | None = None
    tracking_experiment: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("run.checkpoint_every and run.keep_checkpoints must be >= 1")
        _non_negative("run", evaluate_every=self.evaluate_every)
        if not self.storage_path:
            raise ValueError("run.storage_path may not be empty")
        if self.tracking not in ("none", "mlflow"):
            raise ValueError(f"run.tracking must be one of ['none', 'mlflow'], "
                             f"got {self.tracking!r}")
        if self.tracking_uri is not None and not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:",
                                                          self.tracking_uri):
            raise ValueError(f"run.tracking_uri must be a URI with a scheme (http://..., "
                             f"https://..., sqlite:///..., databricks), got "
                             f"{self.tracking_uri!r}")
        if self.tracking_experiment is not None and not self.tracking_experiment.strip():
            raise ValueError("run.tracking_experiment may not be empty (null: the "
                             "experiment's name)")


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
        clients = len(self.data.domains) * self.data.clients_per_domain
        for key in ("min_fit_clients", "min_evaluate_clients"):
            if getattr(self.strategy, key) > clients:
                raise ValueError(f"strategy.{key}={getattr(self.strategy, key)} exceeds the "
                                 f"federation's {clients} clients (data.domains x "
                                 f"data.clients_per_domain)")
        if (self.strategy.sampling().samples_fit and self.evaluation.baselines
                and self.evaluation.equal_budgets):
            raise ValueError(f"strategy.fraction_fit={self.strategy.fraction_fit}: a sampled "
                             "client trains a random number of rounds, so the study cannot "
                             "give every arm the same client epochs; set "
                             "evaluation.baselines=[] or evaluation.equal_budgets=false")
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
        if self.distill.mae_weight > 0 and self.pretrain.method != "mim":
            raise ValueError(f"distill.mae_weight={self.distill.mae_weight} keeps the MIM "
                             f"objective during distillation and needs the MIM base's decoder: "
                             f"set pretrain.method=mim (got {self.pretrain.method!r})")
        self._check_privacy()
        self._check_fp16()
        if self.pretrain.method == "mim" and self.model.arch != "vit":
            raise ValueError("pretrain.method=mim needs model.arch=vit (MONAI's MAE is a ViT); "
                             f"got model.arch={self.model.arch!r}")
        for name in self.evaluation.baselines:
            self.baseline_rounds(name)  # every baseline's budget must match (or be allowed)
        self._check_dp()

    def _check_dp(self) -> None:
        """``privacy.dp`` against what it cannot cover: a pooled oracle client, a global
        gradient clip on top of the per-sample one, and encoders Opacus cannot train (each
        family the clients use is built and tried, :func:`engine.nn.privacy.dp_incompatibility`)."""
        if not self.privacy.dp.enabled:
            return
        pooled = [getattr(cls, "name", str(cls)) for cls in self.strategy_classes()
                  if cls.pooled]
        if pooled:
            raise ValueError(f"privacy.dp: {', '.join(map(repr, pooled))} trains one oracle "
                             f"client on every domain's pooled data, which no per-client "
                             f"guarantee covers; drop it (evaluation.baselines)")
        if self.train.grad_clip is not None:
            raise ValueError("train.grad_clip: privacy.dp clips every sample's gradient "
                             "(privacy.dp.max_grad_norm); unset train.grad_clip")
        if self.train.precision == "fp16":
            raise ValueError("train.precision=fp16: its loss scaler does not compose with "
                             "Opacus's per-sample clipping; use bf16 or fp32 with privacy.dp")
        from engine.nn.privacy import dp_incompatibility

        archs = dict.fromkeys([self.model.arch, *self.model.domain_arch.values()])
        for arch in archs:
            reason = dp_incompatibility(self.model.for_arch(arch))
            if reason is not None:
                hint = " (set model.options.norm=group)" if arch == "resnet18" else ""
                raise ValueError(f"privacy.dp: encoder {arch!r} cannot train under DP-SGD: "
                                 f"{reason}{hint}")

    def _check_fp16(self) -> None:
        """``train.precision=fp16`` is a CUDA path: refuse it where a step would run it on
        a CPU (bf16 is the CPU stand-in)."""
        if self.train.precision != "fp16":
            return
        cpu = []
        if self.clients.num_gpus == 0:
            cpu.append("the clients (clients.num_gpus=0)")
        if self.pretrain.method == "mim" and not self.pretrain.use_gpu:
            cpu.append("MIM pretraining (pretrain.use_gpu=false)")
        if self.runs_distillations and not self.distill.use_gpu:
            cpu.append("distillation (distill.use_gpu=false)")
        if self.privacy.dp.enabled:
            raise ValueError("train.precision=fp16 with privacy.dp.enabled: DP-SGD steps "
                             "through Opacus without fp16's loss scaler; use bf16 or fp32")
        if cpu:
            raise ValueError(f"train.precision=fp16 needs CUDA, but {' and '.join(cpu)} "
                             "would run it on a CPU; use train.precision=bf16 there")

    def _check_privacy(self) -> None:
        """``privacy.transfer`` and ``model.domain_arch`` against what the strategies declare
        and the levers that need a teacher's weights or network on the server."""
        transfer = self.privacy.transfer
        if transfer not in ("weights", "predictions"):
            raise ValueError(f"privacy.transfer must be 'weights' or 'predictions', got "
                             f"{transfer!r}")
        unknown = sorted(set(self.model.domain_arch) - set(self.data.domains))
        if unknown:
            raise ValueError(f"model.domain_arch names domains that are not in data.domains: "
                             f"{unknown}")
        heterogeneous = any(self.model.own_arch([d]) for d in self.data.domains)
        try:
            self.strategy.strategy_class.check_transfer(self.strategy.options, transfer,
                                                        heterogeneous=heterogeneous)
        except ValueError as err:
            raise ValueError(f"strategy: {err}") from err
        if transfer != "predictions":
            return
        for name in self.evaluation.baselines:
            try:
                resolve_strategy(name).check_transfer(
                    self.evaluation.baseline_strategy(name, 1).options, transfer)
            except ValueError as err:
                raise ValueError(f"evaluation.baselines: {err} (a baseline's clients would "
                                 "release weights)") from err
        d = self.distill
        if d.augment or d.mixup_alpha > 0:
            raise ValueError("distill.augment / distill.mixup_alpha need the teachers on each "
                             "batch's random view, but privacy.transfer=predictions has only "
                             "their outputs on the plain pool images; turn them off")
        if "merged" in self.evaluation.encoders:
            raise ValueError("evaluation.encoders: 'merged' averages the clients' fine-tuned "
                             "weights, which privacy.transfer=predictions keeps at the "
                             "clients; drop it")
        if self.evaluation.lodo_domains:
            raise ValueError("evaluation.lodo_domains distils teachers the clients return as "
                             "weights, which privacy.transfer=predictions forbids; drop it")

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
