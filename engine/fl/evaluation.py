"""Evaluations after the main run, all federated (clients return metrics only).

* Downstream fine-tuning: every client fine-tunes a fresh head and the encoder for the same
  budget (epochs, seeds, data, head init and batch order) from each candidate encoder —
  the global model's and the MIM base's — and scores it on its own test split.
* Leave-one-domain-out: a global model is distilled from the other domains' teachers only,
  then the held-out domain is fine-tuned from it and from the MIM base.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from engine.fl.protocols import ClientPool
from engine.records.results import Results
from strategies.distill import DistillRequest, DistillService, DistillSettings, Teacher
from strategies.state import encoder_of
from strategies.types import ClientInfo, FitIns, State
from strategies.universal import teachers_from

logger = logging.getLogger(__name__)


def finetune_compare(actors: ClientPool, infos: Mapping[str, ClientInfo], cids: Sequence[str],
                     encoders: Mapping[str, State], *, epochs: int, seeds: Sequence[int],
                     results: Results) -> list[dict[str, Any]]:
    """Fine-tune ``cids`` from each encoder in ``encoders`` (method -> encoder state).

    Each (client, seed) pair gets identical training randomness under every method, so the
    methods differ only by their starting encoder. Rows go into ``results``; returns the
    failed (method, seed, client) calls with their reasons, so a pair that drops out of a
    comparison is reported, never silently missing.
    """
    failures: list[dict[str, Any]] = []
    for method, encoder in encoders.items():
        shared = dict(encoder)
        for seed in seeds:
            instructions = {cid: FitIns(state=shared, fresh_heads=tuple(infos[cid].domains),
                                        config={"epochs": epochs, "select_on_val": True,
                                                "round": 0, "seed": seed})
                            for cid in cids}
            done, failed = actors.run("finetune", instructions)
            for cid, reason in sorted(failed.items()):
                logger.warning("fine-tuning %s (%s, seed %d) failed: %s", cid, method, seed,
                               reason)
                failures.append({"method": method, "seed": seed, "client": cid,
                                 "reason": str(reason)[:2000]})
            for cid, res in done.items():
                for domain, metrics in res.metrics.items():
                    results.add(method, seed, cid, domain, metrics)
    return failures


def base_teachers(actors: ClientPool, infos: Mapping[str, ClientInfo], cids: Sequence[str],
                  base: State, *, epochs: int, seed: int) -> list[Teacher]:
    """Every client fine-tuned once from the base: the teachers of the LODO global models."""
    shared = dict(base)
    instructions = {cid: FitIns(state=shared, fresh_heads=tuple(infos[cid].domains),
                                config={"epochs": epochs, "select_on_val": True, "round": 0,
                                        "seed": seed}) for cid in cids}
    done, failed = actors.run("fit", instructions)
    if failed:
        logger.warning("LODO teachers missing for %s", sorted(failed))
    return teachers_from(done, infos)


def lodo_encoder(distiller: DistillService, base: State, teachers: Sequence[Teacher],
                 held_out: str, settings: DistillSettings, seed: int) -> tuple[State, Any]:
    """A global encoder distilled from every teacher except those of ``held_out``."""
    kept = [t for t in teachers if t.domain != held_out]
    heads = {t.domain: (t.task, t.num_classes) for t in kept}
    request = DistillRequest(student=dict(base), teachers=kept, previous={}, heads=heads,
                             settings=settings, seed=seed, tag=f"lodo-{held_out}")
    result = distiller.distil(request)
    return encoder_of(result.state), result
