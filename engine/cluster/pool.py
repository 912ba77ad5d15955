"""A pool of client actors: placement, dispatch, retries after a crash."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.cluster.actors import ClientActor
from engine.cluster.connect import alive_nodes
from engine.cluster.resources import ResourceError, check_capacity
from engine.cluster.transport import register_tensor_transport
from engine.config import ExperimentConfig
from engine.config.plugins import Plugins
from engine.fl.client import ClientSpec
from engine.fl.failures import ClientFailure
from strategies.types import ClientInfo, State

logger = logging.getLogger(__name__)

Observer = Callable[[str, str, Any], None]
"""Sees ``(client id, method, message)`` for everything a client actor sends back."""


def split_shared(states: Sequence[Mapping[str, Any]]) -> tuple[State, list[State]]:
    """Factor out the tensors every state shares (same object), to ship them once per round.

    Returns the shared part and, per state, the rest.
    """
    if not states:
        return {}, []
    first = states[0]
    shared = {k: v for k, v in first.items() if all(s.get(k) is v for s in states[1:])}
    rest = [{k: v for k, v in s.items() if k not in shared} for s in states]
    return shared, rest


class ActorPool:
    """``K`` client actors serving ``N >= K`` clients; client ``i`` lives on actor ``i % K``."""

    def __init__(self, actors: list[Any], home: dict[str, int], infos: dict[str, ClientInfo],
                 max_retries: int, ready_timeout_s: float,
                 observers: Sequence[Observer] = (), task_timeout_s: float | None = None,
                 dispatch: str = "client") -> None:
        self.task_timeout_s = task_timeout_s
        self.dispatch = dispatch
        self.actors = actors
        self.home = home
        self._infos = infos
        self.max_retries = max_retries
        self.ready_timeout_s = ready_timeout_s
        self.observers = list(observers)

    @classmethod
    def start(cls, cfg: ExperimentConfig, specs: Sequence[ClientSpec],
              observers: Sequence[Observer] = ()) -> ActorPool:
        """Check capacity, start the actors, load every client's data and onboard it.

        ``observers`` see every object a client actor sends back (onboarding announcements
        and task results), e.g. to audit that only weights and metrics leave a client.
        """
        res = cfg.clients
        count = min(res.num_actors or len(specs), len(specs))
        register_tensor_transport()  # states as raw bytes, out of band (engine.cluster.transport)
        check_capacity(alive_nodes(), count, res.num_cpus, res.num_gpus)
        groups: list[list[ClientSpec]] = [[] for _ in range(count)]
        home: dict[str, int] = {}
        for i, spec in enumerate(specs):
            groups[i % count].append(spec)
            home[spec.cid] = i % count
        # Never inherit a caller's placement group (a Tune trial's): client actors are
        # accounted for by the sweep's concurrency limit, not by the trial's bundle.
        free = PlacementGroupSchedulingStrategy(placement_group=None)
        plugins = Plugins.capture() or None  # the driver's registrations, for every actor
        actors = [ClientActor.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                      max_restarts=res.max_restarts, max_task_retries=0,
                                      scheduling_strategy=free)
                  .remote(group, cfg.model, cfg.train, cfg.data, seed=cfg.seed,
                          num_threads=max(1, int(res.num_cpus)), plugins=plugins,
                          fused_clients=res.fused_clients)
                  for group in groups]
        refs = [a.infos.remote() for a in actors]
        try:
            announced = ray.get(refs, timeout=res.ready_timeout_s)
        except GetTimeoutError as err:
            for a in actors:
                ray.kill(a)
            raise ResourceError(
                f"{count} client actors did not start within clients.ready_timeout_s="
                f"{res.ready_timeout_s:g}s (placement pending or data loading too slow); "
                "lower clients.num_actors / num_cpus / num_gpus or raise the timeout") from err
        except (RayActorError, RayTaskError) as err:
            for a in actors:
                ray.kill(a)
            raise RuntimeError(f"a client actor failed while loading its data: {err}") from err
        infos = {i.cid: i for group in announced for i in group}
        for info in infos.values():
            for observe in observers:
                observe(info.cid, "infos", info)
        logger.info("started %d client actors for %d clients", count, len(specs))
        return cls(actors, home, infos, res.max_retries, res.ready_timeout_s, observers,
                   task_timeout_s=res.task_timeout_s, dispatch=res.dispatch)

    def infos(self) -> dict[str, ClientInfo]:
        """Client id -> onboarding announcement."""
        return dict(self._infos)

    def actor_of(self, cid: str) -> Any:
        """The actor handle serving client ``cid``."""
        return self.actors[self.home[cid]]

    def run(self, method: str, instructions: Mapping[str, Any],
            on_done: Callable[[], None] | None = None,
            on_submitted: Callable[[], object] | None = None
            ) -> tuple[dict[str, Any], dict[str, ClientFailure]]:
        """Call ``method`` (``fit`` or ``evaluate``) on every client; retry after crashes.

        Tensors common to every instruction go to the object store once. A task whose
        actor died is resubmitted (Ray restarts the actor) up to ``max_retries`` times;
        application errors are not retried. Returns ``(results, failures)`` by client id.
        """
        cids = sorted(instructions)
        shared, rest = split_shared([instructions[c].state for c in cids])
        shared_ref = ray.put(shared)
        payload = {}
        for cid, own in zip(cids, rest, strict=True):
            ins = instructions[cid]
            payload[cid] = type(ins)(**{**ins.__dict__, "state": own})
        # a task per client, or (dispatch: actor) per actor with all of its clients
        if self.dispatch == "actor":
            shares: dict[int, list[str]] = {}
            for cid in cids:
                shares.setdefault(self.home[cid], []).append(cid)
            keys = [tuple(share) for share in shares.values()]
        else:
            keys = [(cid,) for cid in cids]

        def submit(key: tuple[str, ...]) -> Any:
            actor = self.actor_of(key[0])
            if self.dispatch == "actor":
                return actor.run_many.remote(method, shared_ref,
                                             [(cid, payload[cid]) for cid in key])
            return getattr(actor, method).remote(key[0], shared_ref, payload[key[0]])

        pending = {submit(key): (key, 0) for key in keys}
        if on_submitted is not None:
            on_submitted()
        results: dict[str, Any] = {}
        failures: dict[str, ClientFailure] = {}
        done = on_done or (lambda: None)
        started = {ref: time.monotonic() for ref in pending}
        timed_out: set[str] = set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                key, attempt = pending.pop(ref)
                started.pop(ref, None)
                try:
                    got = ray.get(ref)
                    answers = got if self.dispatch == "actor" else [(key[0], got)]
                    for cid, answer in answers:
                        if isinstance(answer, ClientFailure):
                            failures[cid] = answer
                        else:
                            results[cid] = answer
                            for observe in self.observers:
                                observe(cid, method, answer)
                        done()
                except RayActorError as err:
                    kind = "timeout" if key[0] in timed_out else "actor_died"
                    if attempt < self.max_retries and self._await_restart(key[0]):
                        logger.warning("client(s) %s: %s during %s (%s); retry %d/%d",
                                       ", ".join(key), kind.replace("_", " "), method,
                                       type(err).__name__, attempt + 1, self.max_retries)
                        timed_out.difference_update(key)
                        retry = submit(key)
                        pending[retry] = (key, attempt + 1)
                        started[retry] = time.monotonic()
                    else:
                        message = (f"no result within clients.task_timeout_s="
                                   f"{self.task_timeout_s:g}s" if kind == "timeout" else str(err))
                        for cid in key:
                            failures[cid] = ClientFailure(kind, message)
                            done()
                except RayTaskError as err:
                    for cid in key:
                        failures[cid] = ClientFailure("task_error", str(err))
                        done()
            self._stop_hung(pending, started, timed_out)
        return results, failures

    def _stop_hung(self, pending: Mapping[Any, tuple[tuple[str, ...], int]],
                   started: dict[Any, float], timed_out: set[str]) -> None:
        """Kill (Ray restarts) the actor of every task past ``task_timeout_s``: a hung client
        is then a failure handled like a crash (retried, then recorded)."""
        if self.task_timeout_s is None:
            return
        now = time.monotonic()
        for ref, (key, _) in pending.items():
            if key[0] not in timed_out and now - started.get(ref, now) > self.task_timeout_s:
                logger.warning("client(s) %s: no result after %.0f s (clients.task_timeout_s)"
                               "; restarting the actor", ", ".join(key), now - started[ref])
                timed_out.update(key)
                ray.kill(self.actor_of(key[0]), no_restart=False)

    def _await_restart(self, cid: str) -> bool:
        """Wait until the actor of ``cid`` answers again (Ray restarts it and it reloads its
        clients' data); False when it is gone for good or not back within the ready timeout.
        """
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.actor_of(cid).ping.remote(), timeout=self.ready_timeout_s)
                return True
            except ActorUnavailableError:
                time.sleep(0.5)
            except (ActorDiedError, GetTimeoutError):
                return False
        return False

    def describe(self) -> list[dict[str, Any]]:
        """Each actor's pid and devices."""
        return ray.get([a.describe.remote() for a in self.actors])

    def shutdown(self) -> None:
        """Kill every actor."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
