"""Evaluations after the main run, all federated (clients return metrics only).

* Encoder evaluations: every client judges each candidate encoder (the global model's, the
  MIM base's, a random one, FedAvg's, the merged one) by full fine-tuning, a linear probe or
  k-NN on frozen features, at a fraction of its labels, with the same budget (epochs,
  seeds, labelled subset, head init and batch order) for every encoder, and scores it on
  its own test split.
* Leave-one-domain-out: a global model is distilled from the other domains' teachers only,
  then the held-out domain is fine-tuned from it and from the MIM base.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from engine.fl.protocols import ClientPool
from engine.records.progress import current
from engine.records.results import Results
from strategies.distill import DistillRequest, DistillService, DistillSettings, Teacher
from strategies.state import encoder_of
from strategies.types import ClientInfo, FitIns, State
from strategies.universal import teachers_from

logger = logging.getLogger(__name__)


def evaluate_encoders(actors: ClientPool, infos: Mapping[str, ClientInfo],
                      cids: Sequence[str], encoders: Mapping[str, State],
                      config: Mapping[str, Any], *, seeds: Mapping[int, int],
                      results: Results, replicate: int = 0) -> list[dict[str, Any]]:
    """Judge each encoder of ``encoders`` (method -> encoder state) at ``cids``.

    Every client runs ``config`` (``mode``: ``finetune``, ``linear_probe`` or ``knn``;
    ``label_fraction``, ``subset_seed``, ``epochs``, ``k``, see ``Client.finetune``) on a
    fresh head from each encoder, once per evaluation seed (``seeds``: the seed recorded
    -> the seed the clients train with), and returns only its test metrics. Each (client,
    seed) gets identical randomness and labelled subset under every method, so the methods
    differ only by their starting encoder. Rows go into ``results`` under ``replicate``;
    returns the failed (method, seed, client) calls with their reasons, so a pair that drops
    out of a comparison is reported, never silently missing.
    """
    failures: list[dict[str, Any]] = []
    for method, encoder in encoders.items():
        shared = dict(encoder)
        for seed, train_seed in seeds.items():
            instructions = {cid: FitIns(state=shared, fresh_heads=tuple(infos[cid].domains),
                                        config={**config, "round": 0, "seed": train_seed})
                            for cid in cids}
            display = current()
            display.task(f"{config.get('mode')}: {method}, seed {seed}", len(instructions))
            done, failed = actors.run("finetune", instructions, display.advance)
            for cid, reason in sorted(failed.items()):
                logger.warning("%s of %s (%s, seed %d) failed: %s", config.get("mode"), cid,
                               method, seed, reason)
                failures.append({"method": method, "seed": seed, "client": cid,
                                 "reason": str(reason)[:2000]})
            aucs = []
            for cid, res in done.items():
                for domain, metrics in res.metrics.items():
                    results.add(method, seed, cid, domain, metrics, replicate=replicate)
                    if "auc" in metrics and not math.isnan(metrics["auc"]):
                        aucs.append(float(metrics["auc"]))
            if aucs:
                display.metric(f"{config.get('mode')} {config.get('split', 'test')} AUC (mean)",
                               sum(aucs) / len(aucs), f"{method}, seed {seed}")
            display.advance_step()
    return failures


def base_teachers(actors: ClientPool, infos: Mapping[str, ClientInfo], cids: Sequence[str],
                  base: State, *, epochs: int, seed: int) -> list[Teacher]:
    """Every client fine-tuned once from the base: the teachers of the LODO global models."""
    shared = dict(base)
    instructions = {cid: FitIns(state=shared, fresh_heads=tuple(infos[cid].domains),
                                config={"epochs": epochs, "select_on_val": True, "round": 0,
                                        "seed": seed}) for cid in cids}
    current().task("teachers: every client fine-tuned from the base", len(instructions))
    done, failed = actors.run("fit", instructions, current().advance)
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
