"""umim as a Flower app: a ``ServerApp`` and a ``ClientApp`` configured by an experiment YAML.

The app that ``flwr run`` ships lives in ``examples/flower-app/`` (its ``pyproject.toml``
and two one-line modules); everything it does is here, so it is imported, linted and tested
with the engine. Both sides read Flower's run config (``[tool.flwr.app.config]`` of the
app's ``pyproject.toml``, overridden by ``flwr run --run-config``), whose keys
:class:`AppSettings` lists; ``experiment`` names a umim experiment YAML, of which the app
uses ``seed``, ``data``, ``model``, ``train``, ``clients.num_cpus`` (torch threads of a
ClientApp) and ``strategy`` (rounds, and the options of a FedAvg-family strategy).

Server
------
:func:`make_server_app`: Flower's message-based ``FedAvg`` over the **shared encoder**
only: it sends the ``encoder.*`` arrays of the experiment's seeded initial model (as
:func:`~engine.run.session.initial_encoder` draws it, so the start equals the engine's
random start), averages the replies weighted by ``num-examples``, evaluates federatedly on
``eval-split`` after every round and once more on ``final-split`` at the end. Heads never
leave the nodes (:mod:`engine.interop.flower` keeps them in each node's ``Context.state``);
with ``data.clients_per_domain > 1`` this differs from umim's own ``fedavg``, which also
averages a head among the clients of its domain. A failed or missing client reply stops the
run with an error (unless ``accept-failures``), and so do two nodes that serve the same
client. Per-client and aggregated metrics are logged through Flower's logger (so
``flwr run --stream`` shows them) and, with ``metrics-out``, written as JSON
(:meth:`FlowerRunRecord.to_json`) on the machine that runs the ServerApp.

Clients
-------
:func:`make_experiment_client_app`: the node's ``node_config["partition-id"]`` is the index
of its client in the engine's own client order
(:func:`~engine.run.session.client_specs`: the domains of ``data.domains`` in order, each
split into ``data.clients_per_domain`` parts); only that client's shards are built on the
node (from ``data-root`` / ``cache-dir`` of the node config if given, else the
experiment's and the environment's, e.g. ``UMIM_DATA_ROOT``). ``num-partitions``, if set,
must equal the experiment's number of clients.

Relative ``experiment`` paths are looked up in the process's working directory, then in the
installed app's own folder (a YAML shipped inside the app), then in the umim checkout.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch

with warnings.catch_warnings():  # flwr imports typer, which uses click APIs click deprecates
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.common.logger import log
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

from engine.config import ExperimentConfig, load_config
from engine.fl.client import Client
from engine.fl.simulation import make_strategy
from engine.interop.flower import (
    CLIENT_KEY,
    WEIGHT_KEY,
    make_client_app,
    state_to_arrays,
)
from engine.run.session import client_specs, initial_encoder, resolve_paths
from strategies.fedavg import FedAvg as UmimFedAvg

UMIM_ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds ``engine/`` (the checkout, for an editable install)."""
SPLITS = ("train", "val", "test")


# -- run config ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AppSettings:
    """The app's keys of Flower's run config (``--run-config 'key=value ...'``).

    Attributes
    ----------
    experiment
        Path of the umim experiment YAML (absolute, or relative as the module docstring
        says). Required.
    overrides
        Space-separated dotted ``key=value`` overrides of the experiment, as
        ``umim run --set`` takes them (e.g. ``"data.max_train_samples=64 train.lr=0.01"``);
        ``""``: none.
    num_server_rounds
        FedAvg rounds (``num-server-rounds``); ``0`` (default): the experiment's
        ``strategy.rounds``.
    fraction_train, fraction_evaluate
        Fraction of the connected nodes sampled per round for training / evaluation
        (Flower's FedAvg; at least ``min-nodes`` are sampled). In (0, 1].
    min_nodes
        Nodes that must be connected before a round starts and that every round samples at
        least; ``0`` (default): the experiment's number of clients.
    eval_split
        Split of the per-round federated evaluation (``val`` by default).
    final_split
        Split of one more federated evaluation of the final encoder after the last round
        (``test`` by default); ``""``: none.
    metrics_out
        Path of a JSON file with every client's and the aggregated metrics per round (see
        :class:`FlowerRunRecord`), written by the ServerApp; ``""`` (default): none.
    round_timeout
        Seconds a round waits for the nodes' replies.
    accept_failures
        Go on when a node fails or does not reply in time (Flower's default behaviour);
        ``false`` (default): the run stops with an error naming the node.
    """

    experiment: str = ""
    overrides: str = ""
    num_server_rounds: int = 0
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 0
    eval_split: str = "val"
    final_split: str = "test"
    metrics_out: str = ""
    round_timeout: float = 3600.0
    accept_failures: bool = False

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("run config experiment: name an experiment YAML "
                             "(--run-config \"experiment='path/to/experiment.yaml'\")")
        if self.num_server_rounds < 0 or self.min_nodes < 0:
            raise ValueError("run config num-server-rounds and min-nodes must be >= 0")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"run config {_key(name)} must be in (0, 1], got {value}")
        if self.eval_split not in SPLITS:
            raise ValueError(f"run config eval-split must be one of {SPLITS}, "
                             f"got {self.eval_split!r}")
        if self.final_split not in (*SPLITS, ""):
            raise ValueError(f"run config final-split must be one of {SPLITS} or '', "
                             f"got {self.final_split!r}")
        if not self.round_timeout > 0:
            raise ValueError(f"run config round-timeout must be > 0, got {self.round_timeout}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Settings from a Flower run config (kebab-case keys, checked by type).

        Raises
        ------
        ValueError
            On an unknown key, a value of the wrong type, or a bad value.
        """
        types = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(types))
        if unknown:
            raise ValueError(f"run config: unknown key(s) {unknown}; known: {sorted(types)}")
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            default = getattr(cls, types[key].name)
            if isinstance(default, bool):
                ok = isinstance(raw, bool)
            elif isinstance(default, float):
                ok = isinstance(raw, int | float) and not isinstance(raw, bool)
                raw = float(raw) if ok else raw
            elif isinstance(default, int):
                ok = isinstance(raw, int) and not isinstance(raw, bool)
            else:
                ok = isinstance(raw, str)
            if not ok:
                raise ValueError(f"run config {key}: expected {type(default).__name__}, "
                                 f"got {raw!r}")
            values[types[key].name] = raw
        return cls(**values)

    def experiment_path(self, app_dir: Path | None = None) -> Path:
        """The experiment YAML: absolute, else found in the working directory, ``app_dir``
        or the umim checkout (first match).

        Raises
        ------
        ValueError
            If no such file exists.
        """
        path = Path(self.experiment).expanduser()
        if path.is_absolute():
            candidates = [path]
        else:
            candidates = [Path.cwd() / path, *([app_dir / path] if app_dir else []),
                          UMIM_ROOT / path]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ValueError(f"run config experiment: {self.experiment!r} not found (looked at "
                         f"{', '.join(str(c) for c in candidates)})")

    def load_experiment(self, app_dir: Path | None = None) -> ExperimentConfig:
        """The experiment, with ``overrides`` applied (checked as ``umim run`` checks it)."""
        path = self.experiment_path(app_dir)
        try:
            return load_config(path, self.overrides.split())
        except ValueError as err:
            raise ValueError(f"experiment {path}: {err}") from err


def _key(name: str) -> str:
    return name.replace("_", "-")


def check_fedavg(cfg: ExperimentConfig) -> dict[str, bool | int | float | str]:
    """The per-client training options of the experiment's strategy, which must be umim's
    ``fedavg`` or a subclass of it (e.g. ``fedprox``: its ``proximal_mu``).

    Raises
    ------
    ValueError
        For another strategy: the app runs FedAvg of the encoder, nothing else.
    """
    if not issubclass(cfg.strategy.strategy_class, UmimFedAvg):
        raise ValueError(f"strategy.name={cfg.strategy.name!r}: the Flower app runs FedAvg "
                         "over the shared encoder; use an experiment whose strategy is "
                         "fedavg (or a FedAvg subclass such as fedprox), e.g. "
                         "--run-config \"overrides='strategy.name=fedavg'\"")
    config = make_strategy(cfg).fit_config(1, "")
    return {k: v for k, v in config.items() if isinstance(v, bool | int | float | str)}


# -- what the server records --------------------------------------------------------------
@dataclass
class FlowerRunRecord:
    """What a run of the app produced: every reply's metrics, long format, and the
    aggregates.

    Attributes
    ----------
    experiment
        The experiment YAML the run used.
    rounds
        FedAvg rounds run.
    rows
        One dict per client reply and metric: ``round``, ``phase`` (``train``,
        ``evaluate`` or ``final``), ``split`` (evaluation phases; ``train`` for training),
        ``node_id``, ``cid``, ``metric``, ``value``.
    aggregated
        Phase -> round (as a string) -> metric -> FedAvg's weighted mean over the clients.
    shared_keys
        The array keys the server sent and averaged (the encoder's).
    """

    experiment: str
    rounds: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    aggregated: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    shared_keys: list[str] = field(default_factory=list)

    @property
    def clients(self) -> list[str]:
        """The clients that answered at least once, sorted."""
        return sorted({r["cid"] for r in self.rows})

    def to_json(self) -> str:
        """The record as JSON (``clients`` included); NaN (e.g. the AUC of a one-class
        sample) is written as ``null``."""
        data = {**asdict(self), "clients": self.clients}
        return json.dumps(_finite(data), indent=1)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class RecordingFedAvg(FedAvg):
    """Flower's ``FedAvg`` that records every reply, names its client, and refuses failures.

    Parameters
    ----------
    record
        Where the replies' metrics go.
    accept_failures
        Go on when a node fails or misses the round's timeout (else raise).
    kwargs
        Flower ``FedAvg``'s own arguments.
    """

    def __init__(self, record: FlowerRunRecord, accept_failures: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.record = record
        self.accept_failures = accept_failures
        self.phase = "evaluate"
        self.split = "val"
        self._sent: dict[str, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent["train"] = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent["evaluate"] = len(messages)
        self.split = str(config.get("split", "val"))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._record(server_round, "train", "train", replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._aggregate("train", server_round, metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        self._record(server_round, self.phase, self.split, replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        self._aggregate(self.phase, server_round, metrics)
        return metrics

    # -- internals -----------------------------------------------------------------------
    def _record(self, server_round: int, phase: str, split: str,
                replies: list[Message]) -> None:
        sent = self._sent.get("train" if phase == "train" else "evaluate", len(replies))
        problems = [f"node {m.metadata.src_node_id}: {m.error.reason}"
                    for m in replies if m.has_error()]
        if len(replies) < sent:
            problems.append(f"{sent - len(replies)} of {sent} nodes did not reply in time")
        if problems:
            text = f"round {server_round} {phase}: {'; '.join(problems)}"
            if not self.accept_failures:
                raise RuntimeError(f"{text} (run config accept-failures=true to go on)")
            log(WARNING, "%s", text)
        served: dict[str, int] = {}
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            client = msg.content.config_records.get(CLIENT_KEY)
            cid = str(client["cid"]) if client is not None else f"node-{node}"
            if cid in served:
                raise RuntimeError(f"round {server_round} {phase}: nodes {served[cid]} and "
                                   f"{node} both serve client {cid!r} (give every SuperNode "
                                   "its own --node-config partition-id)")
            served[cid] = node
            (metrics,) = msg.content.metric_records.values()
            for name, value in metrics.items():
                self.record.rows.append({"round": server_round, "phase": phase, "split": split,
                                         "node_id": node, "cid": cid, "metric": name,
                                         "value": float(value)})  # type: ignore[arg-type]
            log(INFO, "\t%s %s round %d: %s", cid, phase, server_round,
                ", ".join(f"{k}={float(v):.4f}" for k, v in metrics.items()  # type: ignore[arg-type]
                          if k != WEIGHT_KEY))

    def _aggregate(self, phase: str, server_round: int, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            self.record.aggregated.setdefault(phase, {})[str(server_round)] = {
                k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]


# -- the apps -----------------------------------------------------------------------------
def make_server_app(app_dir: Path | None = None) -> ServerApp:
    """The umim ``ServerApp``: FedAvg of the shared encoder, heads local (module docstring).

    Parameters
    ----------
    app_dir
        The app's folder (relative ``experiment`` paths are also looked up there).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, app_dir)

    return app


def run_server(grid: Grid, context: Context, app_dir: Path | None = None) -> FlowerRunRecord:
    """The body of the ServerApp: the FedAvg rounds, a final evaluation, the record."""
    settings = AppSettings.from_run_config(context.run_config)
    path = settings.experiment_path(app_dir)
    cfg = settings.load_experiment(app_dir)
    fit_options = check_fedavg(cfg)
    num_clients = len(client_specs(cfg, pooled=False, build=False))
    rounds = settings.num_server_rounds or cfg.strategy.rounds
    min_nodes = settings.min_nodes or num_clients
    if cfg.pretrain.method != "none":
        log(WARNING, "pretrain.method=%s: the Flower app does not pretrain; it starts from "
            "the seeded random encoder", cfg.pretrain.method)
    if cfg.data.clients_per_domain > 1:
        log(WARNING, "data.clients_per_domain=%d: heads stay on their nodes and are not "
            "averaged within a domain (umim's fedavg averages them)",
            cfg.data.clients_per_domain)
    log(INFO, "umim: experiment %s (%s), %d client(s), %d round(s), FedAvg of the encoder",
        path, cfg.name, num_clients, rounds)

    initial = state_to_arrays(initial_encoder(cfg))
    record = FlowerRunRecord(experiment=str(path), rounds=rounds, shared_keys=list(initial))
    strategy = RecordingFedAvg(
        record, accept_failures=settings.accept_failures,
        fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes)
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=settings.round_timeout,
        train_config=ConfigRecord({"seed": cfg.seed, **fit_options}),
        evaluate_config=ConfigRecord({"split": settings.eval_split}))
    if set(result.arrays) != set(initial):
        raise RuntimeError(f"FedAvg returned {len(result.arrays)} of {len(initial)} encoder "
                           "arrays: no round was aggregated")
    if settings.final_split:
        strategy.phase = "final"
        replies = grid.send_and_receive(
            strategy.configure_evaluate(rounds, result.arrays,
                                        ConfigRecord({"split": settings.final_split}), grid),
            timeout=settings.round_timeout)
        final = strategy.aggregate_evaluate(rounds, replies)
        log(INFO, "umim: final %s metrics of the global encoder: %s", settings.final_split,
            dict(final) if final is not None else None)
    if settings.metrics_out:
        out = Path(settings.metrics_out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(record.to_json())
        log(INFO, "umim: metrics written to %s", out)
    return record


def make_experiment_client_app(app_dir: Path | None = None) -> ClientApp:
    """The umim ``ClientApp``: node ``partition-id`` -> the experiment's client of that index.

    One :class:`Client` is kept per (experiment, partition) and process (Flower's simulation
    runs many messages in one process; the deployment runtime starts a process per message).

    Parameters
    ----------
    app_dir
        The app's folder (relative ``experiment`` paths are also looked up there).
    """
    clients: dict[tuple[Any, ...], Client] = {}

    def factory(context: Context) -> Client:
        settings = AppSettings.from_run_config(context.run_config)
        node = context.node_config
        key = (settings.experiment, settings.overrides, node.get("partition-id"),
               node.get("data-root"), node.get("cache-dir"))
        if key not in clients:
            clients[key] = build_client(settings, node, app_dir)
        return clients[key]

    return make_client_app(factory)


def build_client(settings: AppSettings, node_config: Mapping[str, Any],
                 app_dir: Path | None = None) -> Client:
    """The experiment's client that a node with ``node_config`` serves (shards built here).

    Raises
    ------
    ValueError
        If ``partition-id`` is missing or out of range, or ``num-partitions`` disagrees
        with the experiment's number of clients.
    """
    cfg = settings.load_experiment(app_dir)
    if "partition-id" not in node_config:
        raise ValueError("node config partition-id: missing (flower-supernode --node-config "
                         "'partition-id=0 num-partitions=N')")
    pid = int(node_config["partition-id"])
    specs = client_specs(cfg, pooled=False, build=False)
    if not 0 <= pid < len(specs):
        raise ValueError(f"node config partition-id={pid}: the experiment has {len(specs)} "
                         f"client(s) ({', '.join(s.cid for s in specs)}), ids 0..{len(specs) - 1}")
    if "num-partitions" in node_config and int(node_config["num-partitions"]) != len(specs):
        raise ValueError(f"node config num-partitions={node_config['num-partitions']}: the "
                         f"experiment has {len(specs)} client(s)")
    data_root, cache_dir = node_config.get("data-root"), node_config.get("cache-dir")
    cfg = resolve_paths(cfg, str(data_root) if data_root else None,
                        str(cache_dir) if cache_dir else None)
    torch.set_num_threads(max(1, int(cfg.clients.num_cpus)))
    spec = specs[pid].resolve(cfg.data)
    log(INFO, "umim: node partition-id=%d serves client %s", pid, spec.cid)
    return Client(spec, cfg.model, cfg.train, seed=cfg.seed,
                  max_train_samples=cfg.data.max_train_samples,
                  max_eval_samples=cfg.data.max_eval_samples)
