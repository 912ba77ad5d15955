"""Client actors: long-lived Ray actors, each serving one or more virtual clients.

An actor is a thin wrapper: it builds plain :class:`~engine.fl.client.Client` objects for the
clients it serves (each loads its own shards once) and forwards ``fit`` / ``evaluate``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import ray
import torch

from engine.cluster.transport import register_tensor_transport
from engine.config import DataConfig, ModelConfig, TrainConfig
from engine.config.plugins import Plugins, install
from engine.fl.client import Client, ClientSpec, read_pool, shard_builder
from engine.fl.failures import ClientFailure
from engine.fl.relevance import PublicPool
from strategies.types import ClientInfo, EvaluateIns, EvaluateRes, FitIns, FitRes, State

logger = logging.getLogger(__name__)


class ClientHost:
    """The body of a client actor; plain Python so it can also run in-process."""

    def __init__(self, specs: Sequence[ClientSpec], model: ModelConfig, train: TrainConfig,
                 data: DataConfig, *, seed: int, num_threads: int,
                 plugins: Plugins | None = None, fused_clients: int = 0) -> None:
        install(plugins)  # the driver's registered encoders and sources, before any model
        register_tensor_transport()  # the results' tensors as raw bytes, out of band
        # a process's first torch.optim optimiser imports torch._dynamo (~1-3 s): at start-up,
        # not in the first round's first client
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0).zero_grad()
        self.fused_clients = fused_clients
        self._told: set[str] = set()  # why some fits were not fused, logged once each
        torch.set_num_threads(max(1, num_threads))
        models: dict[tuple, Any] = {}  # one network per head layout, shared by the clients
        builder = shard_builder(data)
        # the public pool, read on this node once, when a fit first asks for pool scores
        pool = functools.cache(lambda: PublicPool.from_shard(read_pool(data)))
        self.clients = {s.cid: Client(s.resolve(data, builder), model, train, seed=seed,
                                      max_train_samples=data.max_train_samples,
                                      max_eval_samples=data.max_eval_samples, models=models,
                                      pool=pool)
                        for s in specs}

    def infos(self) -> list[ClientInfo]:
        """Onboarding announcements of every client served here."""
        return [c.info() for c in self.clients.values()]

    def fit(self, cid: str, shared: State, ins: FitIns) -> FitRes:
        """Train client ``cid``; ``shared`` holds the tensors common to every client. The
        client's result (weights, metrics and any ``pool_scores``) is returned unchanged."""
        ins.state = {**shared, **ins.state}
        return self.clients[cid].fit(ins)

    def evaluate(self, cid: str, shared: State, ins: EvaluateIns) -> EvaluateRes:
        """Score client ``cid`` on its own data."""
        ins.state = {**shared, **ins.state}
        return self.clients[cid].evaluate(ins)

    def finetune(self, cid: str, shared: State, ins: FitIns) -> EvaluateRes:
        """Fine-tune client ``cid`` and score it on its test split (metrics only)."""
        ins.state = {**shared, **ins.state}
        return self.clients[cid].finetune(ins)

    def audit(self, cid: str, shared: State, ins: FitIns) -> EvaluateRes:
        """Membership-inference audit of the received model at client ``cid`` (the
        attack's scalars only; :meth:`engine.fl.client.Client.audit`)."""
        ins.state = {**shared, **ins.state}
        return self.clients[cid].audit(ins)

    def run_many(self, method: str, shared: State, work: Sequence[tuple[str, Any]]
                 ) -> list[tuple[str, Any]]:
        """Call ``method`` (``fit``, ``evaluate``, ...) for each ``(client id, instructions)``
        of ``work`` in turn: one task for an actor's whole share of a round
        (``clients.dispatch: actor``). Returns ``(client id, result)`` pairs, in order; a
        client whose call raised gets a :class:`~engine.fl.failures.ClientFailure`
        (``task_error``) instead, and the others still run."""
        if method not in ("fit", "evaluate", "finetune", "audit"):
            raise ValueError(f"run_many: unknown client method {method!r}")
        call = getattr(self, method)
        out: list[tuple[str, Any]] = []
        if method == "fit" and self.fused_clients > 1 and len(work) > 1:
            out, work = self._fit_fused(shared, work)
        for cid, ins in work:
            try:
                out.append((cid, call(cid, shared, ins)))
            except Exception as err:  # one client's error is that client's failure
                out.append((cid, ClientFailure("task_error", f"{type(err).__name__}: {err}")))
        return out

    def _fit_fused(self, shared: State, work: Sequence[tuple[str, Any]]
                   ) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """Train the fusable fits of ``work`` in fused steps (:mod:`engine.fl.fused_fit`);
        returns their ``(client id, result)`` pairs and the work left to do one by one."""
        from engine.fl.fused_fit import fit_fused, plan_fused

        clients = [self.clients[cid] for cid, _ in work]
        fits = []
        for _, ins in work:
            ins.state = {**shared, **ins.state}
            fits.append(ins)
        groups, alone = plan_fused(clients, fits)
        for _, why in alone:
            if why not in self._told:
                self._told.add(why)
                logger.warning("clients.fused_clients: a fit is trained alone (%s)", why)
        out: list[tuple[str, Any]] = []
        for group in groups:
            if len(group) < 2:
                alone.append((group[0], "alone in its group"))
                continue
            try:
                results = fit_fused([clients[i] for i in group], [fits[i] for i in group],
                                    chunk=self.fused_clients)
            except Exception as err:  # the whole step failed: its clients' failure
                failure = ClientFailure("task_error", f"fused fit: {type(err).__name__}: {err}")
                out += [(work[i][0], failure) for i in group]
                continue
            out += [(work[i][0], res) for i, res in zip(group, results, strict=True)]
        rest = [(work[i][0], fits[i]) for i, _ in sorted(alone)]  # (merging again: a no-op)
        return out, rest

    def ping(self) -> bool:
        """Liveness check (answers once the actor has loaded its clients)."""
        return True

    def describe(self) -> dict[str, Any]:
        """Process id, devices and client sizes (for tests and logs)."""
        return {"pid": os.getpid(), "cuda": torch.cuda.is_available(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": ray.get_gpu_ids() if ray.is_initialized() else [],
                "clients": [c.describe() for c in self.clients.values()]}


ClientActor = ray.remote(ClientHost)
""":class:`ClientHost` as a Ray actor class (``.options(num_cpus=..., num_gpus=...)``)."""
