"""Fail fast when the cluster cannot hold what an experiment asks for."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


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
