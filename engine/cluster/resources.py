"""Fail fast when the cluster cannot hold what an experiment asks for: client actors,
Train workers and sweep trials, counted node by node."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from engine.config import ExperimentConfig


class ResourceError(RuntimeError):
    """The cluster cannot place the requested actors or workers; says which knob to lower."""


def slots_on_node(node: Mapping[str, float], num_cpus: float, num_gpus: float) -> int:
    """How many actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs fit on one node.

    A fractional GPU request must fit inside a single GPU (Ray never splits an actor over
    two), so ``num_gpus=0.4`` fits twice per GPU, not two and a half times.
    """
    cpus = float(node.get("CPU", 0.0))
    gpus = float(node.get("GPU", 0.0))
    by_cpu = math.floor(cpus / num_cpus + 1e-9) if num_cpus > 0 else math.inf
    if num_gpus <= 0:
        by_gpu = math.inf
    elif num_gpus < 1:
        by_gpu = math.floor(gpus + 1e-9) * math.floor(1.0 / num_gpus + 1e-9)
    else:
        by_gpu = math.floor(gpus / num_gpus + 1e-9)
    slots = min(by_cpu, by_gpu)
    return 0 if slots == math.inf else int(slots)


def check_capacity(nodes: Sequence[Mapping[str, float]], count: int, num_cpus: float,
                   num_gpus: float, *, what: str = "client actors",
                   knobs: str = "clients.num_actors, clients.num_cpus or clients.num_gpus"
                   ) -> None:
    """Raise :class:`ResourceError` unless ``count`` actors of the given size fit.

    Parameters
    ----------
    nodes
        Total resources of each alive node (``{"CPU": 16, "GPU": 1, ...}``).
    count, num_cpus, num_gpus
        The request.
    what, knobs
        Words for the message: what is placed and which config keys shrink it.
    """
    if num_cpus <= 0 and num_gpus <= 0:
        return
    capacity = sum(slots_on_node(n, num_cpus, num_gpus) for n in nodes)
    if count > capacity:
        total_cpu = sum(float(n.get("CPU", 0)) for n in nodes)
        total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
        raise ResourceError(
            f"{count} {what} need {num_cpus:g} CPU and {num_gpus:g} GPU each, but the cluster "
            f"({len(nodes)} node(s), {total_cpu:g} CPU, {total_gpu:g} GPU in all) fits only "
            f"{capacity}. Lower {knobs}, or add nodes.")


# -- one per-node calculator for actors, Train workers and sweep trials ----------------------
Group = tuple[int, float, float]
"""``(count, num_cpus, num_gpus)``: ``count`` processes of that size."""


def _place(nodes: Sequence[Mapping[str, float]], groups: Sequence[Group]) -> bool:
    """Whether every process of ``groups`` fits on ``nodes`` at once (first fit, largest
    first), with Ray's rules: a fractional GPU request fits inside one GPU, a request of
    ``g >= 1`` GPUs takes ``ceil(g)`` whole free GPUs of one node."""
    free = [[float(n.get("CPU", 0.0)), [1.0] * math.floor(float(n.get("GPU", 0.0)) + 1e-9)]
            for n in nodes]
    items = sorted(((c, g) for count, c, g in groups for _ in range(count)),
                   key=lambda item: (item[1], item[0]), reverse=True)
    for cpus, gpus in items:
        for node in free:
            if node[0] + 1e-9 < cpus:
                continue
            devices: list[float] = node[1]
            if gpus <= 0:
                node[0] -= cpus
                break
            if gpus < 1:
                slot = next((i for i, f in enumerate(devices) if f + 1e-9 >= gpus), None)
                if slot is None:
                    continue
                devices[slot] -= gpus
                node[0] -= cpus
                break
            whole = [i for i, f in enumerate(devices) if f >= 1.0 - 1e-9]
            need = math.ceil(gpus - 1e-9)
            if len(whole) < need:
                continue
            for i in whole[:need]:
                devices[i] = 0.0
            node[0] -= cpus
            break
        else:
            return False
    return True


def trial_phases(cfg: ExperimentConfig) -> list[list[Group]]:
    """What one run of ``cfg`` holds at once, phase by phase: MIM pretraining's Train workers
    (before any actor starts), then the client actors together with a distillation's Train
    workers (when a strategy distils or LODO runs)."""
    clients = len(cfg.data.domains) * cfg.data.clients_per_domain + int(cfg.needs_pooled_client)
    actors = min(cfg.clients.num_actors or clients, clients)
    rounds: list[Group] = [(actors, cfg.clients.num_cpus, cfg.clients.num_gpus)]
    d = cfg.distill
    if cfg.runs_distillations:
        rounds.append((d.num_workers, d.cpus_per_worker, d.gpus_per_worker if d.use_gpu else 0))
    phases = [rounds]
    p = cfg.pretrain
    if p.method == "mim":
        phases.insert(0, [(p.num_workers, p.cpus_per_worker,
                           p.gpus_per_worker if p.use_gpu else 0.0)])
    return phases


def trial_resources(cfg: ExperimentConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one run holds at its peak (the largest of :func:`trial_phases`)."""
    totals = [(sum(n * c for n, c, _ in phase), sum(n * g for n, _, g in phase))
              for phase in trial_phases(cfg)]
    return max(t[0] for t in totals), max(t[1] for t in totals)


def concurrent_trials(cfg: ExperimentConfig, nodes: Sequence[Mapping[str, float]],
                      limit: int = 1024) -> int:
    """How many runs of ``cfg`` fit on ``nodes`` at once, node by node (Ray does not reserve
    a Tune trial's Train workers, so a sweep reserves them by this limit).

    Raises
    ------
    ResourceError
        Not even one trial fits.
    """
    phases = trial_phases(cfg)

    def fits(k: int) -> bool:
        return all(_place(nodes, [(n * k, c, g) for n, c, g in phase]) for phase in phases)

    if not fits(1):
        cpu, gpu = trial_resources(cfg)
        total_cpu = sum(float(n.get("CPU", 0)) for n in nodes)
        total_gpu = sum(float(n.get("GPU", 0)) for n in nodes)
        raise ResourceError(
            f"one sweep trial needs {cpu:g} CPU and {gpu:g} GPU (client actors + Train "
            f"workers) but the cluster ({len(nodes)} node(s), {total_cpu:g} CPU, {total_gpu:g} "
            "GPU) cannot place them. Lower clients.num_actors / num_cpus / num_gpus or "
            "distill.num_workers in the sweep's overrides.")
    k = 1
    while k < limit and fits(k + 1):
        k += 1
    return k
