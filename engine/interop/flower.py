"""Flower interop: our plain :class:`~engine.fl.client.Client` as a Flower ``ClientApp``.

An optional adapter (nothing else in ``engine`` imports it) so that a real Flower deployment,
or Flower's own simulation, can drive the very ``Client`` the Ray engine uses. It targets the
Message API of Flower 1.42 (``ClientApp`` with ``@app.train()`` / ``@app.evaluate()``,
``ArrayRecord`` / ``MetricRecord`` / ``ConfigRecord``), which the message-based strategies of
``flwr.serverapp.strategy`` (e.g. ``FedAvg``) speak; the legacy ``NumPyClient`` /
``client_fn`` path is deprecated there.

What crosses the wire
---------------------
* **Train / evaluate request**: one ``ArrayRecord`` (tensors by ``state_dict`` key, as NumPy
  arrays, in the model's ``state_dict`` order) and optionally one ``ConfigRecord``.
* **Train reply**: one ``ArrayRecord`` holding exactly the keys that were received, after
  local training, in ``state_dict`` order, and one ``MetricRecord`` with the client's train
  metrics and ``"num-examples"`` (the FedAvg weight).
* **Evaluate reply**: one ``MetricRecord`` only: ``auc``, ``acc``, ``loss`` (means over the
  client's domains; one domain except a pooled client) and ``"num-examples"``. No weights.
* **Both replies** also carry a ``ConfigRecord`` under ``"client"`` with the client's id
  (``cid``) and its ``domains``, so a server can tell which client answered (Flower's
  strategies count only array and metric records, so it does not disturb them).

Encoder shared, heads local
---------------------------
The server decides what is shared by what it sends. The intended use (our design: FedAvg over
the shared encoder, heads local) is to send only ``encoder.*`` arrays, built with
:func:`initial_arrays`; Flower's ``FedAvg`` then averages exactly those, even across clients
of different domains. A head that is not in the request is taken from the node's
``Context.state`` (Flower keeps one ``Context`` per node for the whole run and rebuilds the
``ClientApp`` for every message, so that is where per-node memory belongs; it never leaves
the node) and, on a node's first round, is initialised fresh from the round's seed. After
training, all of the client's heads are stored back into ``Context.state``.

Heads may also be sent (``initial_arrays(..., include_heads=True)``); they are then loaded,
trained and returned like the encoder, which is only consistent when every sampled client
has the same domain(s) (e.g. IID parts of one domain): Flower's ``FedAvg`` insists on the
same keys in every reply, and a client rejects a head it does not have.

Our :class:`~engine.fl.client.Client` holds no state between calls, so a factory may memoise
one ``Client`` per partition (it then reads its shards once per process).

Example
-------
>>> def factory(context):  # doctest: +SKIP
...     return Client(specs[partition_id(context)], model_cfg, train_cfg, seed=0)
>>> app = make_client_app(factory)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

with warnings.catch_warnings():  # flwr imports typer, which uses click APIs click deprecates
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typer")
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp

from engine.fl.client import Client, derive_seed
from engine.nn.models import MultiHeadNet
from strategies.state import head_prefix, is_encoder_key, is_head_key
from strategies.types import EvaluateIns, FitIns, State

logger = logging.getLogger(__name__)

HEADS_STATE_KEY = "umim.heads"
"""Key of the ``ArrayRecord`` in ``Context.state`` that holds a node's local heads."""
ARRAYS_KEY = "arrays"
"""Key of the ``ArrayRecord`` in a train reply (Flower's default ``arrayrecord_key``)."""
METRICS_KEY = "metrics"
"""Key of the ``MetricRecord`` in every reply."""
WEIGHT_KEY = "num-examples"
"""Metric that carries the number of examples (Flower's default ``weighted_by_key``)."""
ROUND_KEY = "server-round"
"""Config entry that Flower's strategies set to the current round."""
CLIENT_KEY = "client"
"""Key of the ``ConfigRecord`` in every reply that names the client (``cid``, ``domains``)."""

ClientFactory = Callable[[Context], Client]
"""Builds (or returns a memoised) :class:`Client` for the node a ``Context`` describes."""


# -- conversions --------------------------------------------------------------------------
def state_to_arrays(state: Mapping[str, torch.Tensor],
                    keys: Callable[[str], bool] | None = None) -> ArrayRecord:
    """Tensors (``state_dict`` order kept) as an ``ArrayRecord`` of NumPy arrays.

    Parameters
    ----------
    state
        Tensors by ``state_dict`` key.
    keys
        Optional predicate; only keys it accepts are exported.
    """
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in state.items() if keys is None or keys(k)})


def arrays_to_state(record: ArrayRecord, like: Mapping[str, torch.Tensor]) -> State:
    """An ``ArrayRecord`` as CPU tensors with the dtypes (and key order) of ``like``.

    Raises
    ------
    ValueError
        If ``record`` holds a key that ``like`` lacks, or a shape that differs.
    """
    unexpected = sorted(set(record) - set(like))
    if unexpected:
        raise ValueError(f"received arrays that the model does not have: {unexpected[:5]}")
    state: State = {}
    for key, ref in like.items():
        if key not in record:
            continue
        value = torch.tensor(record[key].numpy(), dtype=ref.dtype)  # copies (input is r/o)
        if value.shape != ref.shape and value.numel() == ref.numel() == 1:
            value = value.reshape(ref.shape)  # Flower ships 0-d tensors (counters) as (1,)
        if value.shape != ref.shape:
            raise ValueError(f"{key}: received shape {tuple(value.shape)}, "
                             f"model has {tuple(ref.shape)}")
        state[key] = value
    return state


def initial_arrays(model: MultiHeadNet | Client, include_heads: bool = False) -> ArrayRecord:
    """The arrays a server sends first: the encoder (and optionally the heads) of ``model``.

    Parameters
    ----------
    model
        A :class:`MultiHeadNet`, or a :class:`Client` whose model is used.
    include_heads
        Also share the heads (only for clients that all hold the same domains).
    """
    net = model.model if isinstance(model, Client) else model
    return state_to_arrays(net.state_dict(),
                           lambda k: is_encoder_key(k) or (include_heads and is_head_key(k)))


def partition_id(context: Context) -> int:
    """The node's partition id (set by Flower's simulation; else ``node_config``'s entry)."""
    return int(context.node_config["partition-id"])


def _single(records: Mapping[str, object], kind: str) -> object:
    if len(records) != 1:
        raise ValueError(f"expected exactly one {kind} in the message, got {len(records)}")
    return next(iter(records.values()))


def _config(content: RecordDict) -> ConfigRecord:
    configs = content.config_records
    if not configs:
        return ConfigRecord()
    config = _single(configs, "ConfigRecord")
    assert isinstance(config, ConfigRecord)
    return config


# -- the adapter --------------------------------------------------------------------------
class FlowerClient:
    """One of our :class:`Client` s speaking Flower records; heads kept in ``Context.state``.

    Parameters
    ----------
    client
        The wrapped client.
    state
        The node's ``Context.state``: read for, and updated with, the local heads.
    """

    def __init__(self, client: Client, state: RecordDict) -> None:
        self.client = client
        self.state = state

    def train(self, content: RecordDict) -> RecordDict:
        """Train on the received arrays; reply with the same keys and the train metrics."""
        own = self.client.model.state_dict()
        received = arrays_to_state(self._arrays(content), own)
        state, fresh = self._complete(received, own)
        config = _config(content)
        fit_config: dict[str, float | int | bool | str] = {
            k: v for k, v in config.items() if isinstance(v, bool | int | float | str)}
        server_round = config.get(ROUND_KEY, config.get("round", 0))
        fit_config["round"] = int(server_round)  # type: ignore[arg-type]
        res = self.client.fit(FitIns(state=state, fresh_heads=fresh, config=fit_config))
        self.state[HEADS_STATE_KEY] = state_to_arrays(
            res.state, is_head_key)
        metrics = MetricRecord({k: float(v) for k, v in res.metrics.items()})
        metrics[WEIGHT_KEY] = int(res.num_examples)
        return RecordDict({ARRAYS_KEY: state_to_arrays(res.state, received.__contains__),
                           METRICS_KEY: metrics, CLIENT_KEY: self._identity()})

    def evaluate(self, content: RecordDict) -> RecordDict:
        """Score the received arrays (with the local heads) on ``config["split"]``."""
        own = self.client.model.state_dict()
        state, fresh = self._complete(arrays_to_state(self._arrays(content), own), own)
        for domain in fresh:  # evaluated before ever training here: a seeded fresh head
            logger.warning("%s: no trained head for %s; scoring a fresh one",
                           self.client.cid, domain)
            head = self.client.model.add_head(
                domain, self.client.num_classes[domain],
                seed=derive_seed(self.client.seed, "head", domain))
            state.update({f"{head_prefix(domain)}{k}": v.detach().cpu()
                          for k, v in head.state_dict().items()})
        split = str(_config(content).get("split", "val"))
        res = self.client.evaluate(EvaluateIns(state=state, split=split))
        metrics = MetricRecord({name: _mean([m[name] for m in res.metrics.values()])
                                for name in ("auc", "acc", "loss")})
        metrics[WEIGHT_KEY] = int(res.num_examples)
        return RecordDict({METRICS_KEY: metrics, CLIENT_KEY: self._identity()})

    # -- internals -----------------------------------------------------------------------
    def _identity(self) -> ConfigRecord:
        return ConfigRecord({"cid": self.client.cid, "domains": list(self.client.data)})

    @staticmethod
    def _arrays(content: RecordDict) -> ArrayRecord:
        record = _single(content.array_records, "ArrayRecord")
        assert isinstance(record, ArrayRecord)
        return record

    def _complete(self, received: State, own: Mapping[str, torch.Tensor]
                  ) -> tuple[State, tuple[str, ...]]:
        """Add the heads the request lacks: from ``Context.state``, else mark them fresh."""
        stored: State = {}
        if HEADS_STATE_KEY in self.state:
            kept = self.state[HEADS_STATE_KEY]
            assert isinstance(kept, ArrayRecord)
            stored = arrays_to_state(kept, own)
        state = dict(received)
        fresh = []
        for domain in self.client.num_classes:
            prefix = head_prefix(domain)
            if any(k.startswith(prefix) for k in received):
                continue
            head = {k: v for k, v in stored.items() if k.startswith(prefix)}
            if head:
                state.update(head)
            else:
                fresh.append(domain)
        return state, tuple(fresh)


def _mean(values: list[float]) -> float:
    """Mean of the finite values (``nan`` if none is: e.g. AUC of a one-class sample)."""
    finite = [float(v) for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def make_client_app(factory: ClientFactory) -> ClientApp:
    """A Flower ``ClientApp`` (Message API) that serves ``train`` and ``evaluate``.

    Parameters
    ----------
    factory
        Called with the node's ``Context`` for every message; returns the node's
        :class:`Client` (it may memoise, see the module docstring).

    Returns
    -------
    ClientApp
        Pass it to ``flwr.simulation.run_simulation`` or serve it from a SuperNode.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = FlowerClient(factory(context), context.state).train(msg.content)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = FlowerClient(factory(context), context.state).evaluate(msg.content)
        return Message(reply, reply_to=msg)

    return app
