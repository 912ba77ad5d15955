"""``umim bench distill``: distillation throughput, 8 teachers into one student.

Compares a single-process loop (the same :class:`~engine.train.distill.DistillJob`, no Ray) with
the Ray Train ``TorchTrainer`` at 1 and several workers (DDP). Samples/s counts pool
images through the student per second of training (``steps x batch x workers``), measured
inside the job; ``wall_s`` adds Ray Train's start-up and shut-down around it.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch

from engine.config import ExperimentConfig, TrainScaling, from_dict, to_dict
from engine.data import MISSION_DOMAINS, domain_catalog
from engine.nn.models import build_model
from engine.run.session import resolve_paths
from engine.train.distill import DistillJob, RayTrainDistiller
from engine.train.mim import load_pool
from strategies.distill import DistillRequest, DistillSettings, Teacher
from strategies.state import encoder_of


def _scaling(workers: int) -> TrainScaling:
    """Every row uses the whole machine: the single process all cores (torch's default), each
    of n Train workers cores / n of them (or 1 / n of the GPU)."""
    gpu = torch.cuda.is_available()
    return TrainScaling(num_workers=workers, use_gpu=gpu,
                        cpus_per_worker=1.0 if gpu else max(1.0, (os.cpu_count() or 1) // workers),
                        gpus_per_worker=1.0 / workers if gpu else 1.0)


def _request(cfg: ExperimentConfig, steps: int, batch_size: int, workers: int) -> DistillRequest:
    catalog = domain_catalog()
    teachers = []
    for i, domain in enumerate(MISSION_DOMAINS):
        spec = catalog[domain]
        torch.manual_seed(i)
        net = build_model(cfg.model, {domain: spec.num_classes})
        teachers.append(Teacher(cid=domain, domain=domain, task=spec.task,
                                num_classes=spec.num_classes,
                                state={k: v.detach() for k, v in net.state_dict().items()}))
    student = encoder_of(teachers[0].state)
    settings = replace(DistillSettings(), steps=steps, eval_every=steps, patience=10**6,
                       batch_size=batch_size)
    return DistillRequest(student=student, teachers=teachers, previous={},
                          heads={t.domain: (t.task, t.num_classes) for t in teachers},
                          settings=settings, tag=f"bench-{workers}w")


def bench_distill(*, steps: int = 100, batch_size: int = 256, workers: tuple[int, ...] = (1, 2),
                  pool_size: int = 4000, model: dict[str, Any] | None = None,
                  data_root: str | None = None, cache_dir: str | None = None,
                  precision: str = "auto") -> dict[str, Any]:
    """Time the single-process loop and Ray Train at each worker count (the student's
    forward pass as ``precision`` says, see :mod:`engine.nn.precision`)."""
    from engine.cluster.connect import connect

    cfg = resolve_paths(from_dict(ExperimentConfig, {
        "model": model or {"arch": "vit", "hidden_size": 192, "mlp_dim": 384,
                           "num_layers": 6, "num_heads": 6},
        "data": {"pool_size": pool_size, "data_root": data_root, "cache_dir": cache_dir}}))
    rows = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    request = _request(cfg, steps, batch_size, 1)
    started = time.perf_counter()
    job = DistillJob(request, cfg.model, load_pool(cfg.data), device, precision=precision)
    curve = job.run()
    wall = time.perf_counter() - started
    rows.append({"method": "single process", "workers": 1, "wall_s": wall,
                 "train_s": curve[-1]["elapsed_s"],
                 "samples_per_s": steps * batch_size / curve[-1]["elapsed_s"]})
    connect(cfg.run.address)
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            request = _request(cfg, steps, batch_size, n)
            started = time.perf_counter()
            result = RayTrainDistiller(cfg.model, cfg.data, tmp, scaling=_scaling(n),
                                       precision=precision).distil(request)
            wall = time.perf_counter() - started
            train_s = result.curve[-1]["elapsed_s"]
            rows.append({"method": "Ray Train", "workers": n, "wall_s": wall,
                         "train_s": train_s, "samples_per_s": steps * batch_size * n / train_s})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["throughput_vs_single"] = row["samples_per_s"] / base
    return {"rows": rows, "workload": {"steps": steps, "batch_size": batch_size,
                                       "teachers": len(MISSION_DOMAINS), "pool": pool_size,
                                       "model": to_dict(cfg.model), "precision": precision}}
