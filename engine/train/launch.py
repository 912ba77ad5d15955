"""Launching server-side training jobs (MIM pretraining, distillation) on Ray Train.

Every job is a Ray Train ``TorchTrainer`` (Train V2): DDP over ``num_workers`` workers, gloo
on CPU and NCCL on GPU, checkpoints through ``ray.train.report``. This module holds what the
jobs share: the resource check, the launch, and reading a model back from a checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from engine.cluster.resources import ResourceError
from engine.config.plugins import Plugins, install
from engine.records.progress import current

MODEL_FILE = "model.pt"
PLUGINS_KEY = "__plugins"


def check_train_resources(num_workers: int, use_gpu: bool, *, knob: str,
                          cpus_per_worker: float = 1.0, gpus_per_worker: float = 1.0,
                          wait_s: float = 60.0) -> None:
    """Fail fast when the cluster has not ``num_workers`` free CPUs (and GPUs).

    Client actors hold their CPUs and GPUs for the whole run, so the check uses what is
    *available*, not the cluster's total; Ray Train would otherwise wait for ever. Resources
    of actors that were just stopped come back asynchronously, so the check waits up to
    ``wait_s`` seconds before it gives up.
    """
    import ray

    need_cpu = num_workers * cpus_per_worker
    need_gpu = num_workers * gpus_per_worker if use_gpu else 0.0
    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        enough = (free.get("CPU", 0.0) + 1e-9 >= need_cpu
                  and free.get("GPU", 0.0) + 1e-9 >= need_gpu)
        if enough or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not enough:
        raise ResourceError(
            f"{knob}.num_workers={num_workers} Train workers need {need_cpu:g} CPU and "
            f"{need_gpu:g} GPU, but only {free.get('CPU', 0.0):g} CPU and "
            f"{free.get('GPU', 0.0):g} GPU are free (client actors hold the rest). Lower "
            f"{knob}.num_workers, {knob}.cpus_per_worker or {knob}.gpus_per_worker, set "
            f"{knob}.use_gpu=false, or lower "
            "clients.num_actors / clients.num_cpus / clients.num_gpus.")


def fit_trainer(loop: Callable[[dict[str, Any]], None], config: Mapping[str, Any], *,
                num_workers: int, use_gpu: bool, storage_path: str, name: str,
                knob: str, callbacks: list[Any] | None = None,
                cpus_per_worker: float = 1.0, gpus_per_worker: float = 1.0,
                steps: int | None = None) -> Any:
    """Run ``loop`` on a ``TorchTrainer`` and return its ``ray.train.Result``.

    Parameters
    ----------
    loop, config
        The per-worker training function and its ``train_loop_config``.
    num_workers, use_gpu, cpus_per_worker, gpus_per_worker
        Scaling: ``cpus_per_worker`` CPUs per worker, plus ``gpus_per_worker`` GPUs each
        when ``use_gpu`` (fractions share a CPU or GPU with the client actors).
    storage_path, name
        Where Ray Train keeps the job's checkpoints: a local folder, or a URI such as
        ``s3://bucket/run/train`` (see :func:`train_storage`).
    knob
        Config section named in resource errors (``distill`` or ``pretrain``).
    callbacks
        Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    steps
        How many epochs / steps the job reports at most, for the progress display. While
        a display is open (:func:`engine.records.progress.current`) every report of the
        job reaches it live (:mod:`engine.train.feed`).
    """
    from engine.train.feed import follow

    check_train_resources(num_workers, use_gpu, knob=knob, cpus_per_worker=cpus_per_worker,
                          gpus_per_worker=gpus_per_worker)
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    path, filesystem = train_storage(storage_path)
    display = current()
    if display.enabled:
        display.task(f"{knob} job {name}", steps or 0)
    with (follow(lambda row: display.train_report(knob, name, row)) if display.enabled
          else contextlib.nullcontext()) as feed:
        return _fit(loop, config, num_workers=num_workers, use_gpu=use_gpu,
                    resources=resources, path=path, filesystem=filesystem, name=name,
                    knob=knob, callbacks=[*(callbacks or []), *([feed] if feed else [])],
                    cpus_per_worker=cpus_per_worker)


def _fit(loop: Callable[[dict[str, Any]], None], config: Mapping[str, Any],
         *, num_workers: int, use_gpu: bool, resources: dict[str, float], path: str,
         filesystem: pafs.FileSystem | None, name: str, knob: str, callbacks: list[Any],
         cpus_per_worker: float) -> Any:
    """Build the ``TorchTrainer`` of :func:`fit_trainer` and fit it."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _with_threads(loop, max(1, int(cpus_per_worker))),
        train_loop_config={**config, PLUGINS_KEY: Plugins.capture() or None},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=filesystem,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1)))  # the latest checkpoint
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"{knob} job {name} failed: {result.error}") from result.error
    return result


def train_storage(storage_path: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for ``storage_path``.

    A local folder is passed on as it is (no filesystem). A URI (``s3://...``) is resolved
    here, in the driver, into a pyarrow filesystem and the path on it: the filesystem
    travels to Ray Train's controller and workers with its endpoint
    (``AWS_ENDPOINT_URL`` of the driver), so they write where the driver reads.
    Credentials are not carried: every node resolves its own (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, an instance role, ...).
    """
    if "://" not in storage_path:
        return storage_path, None
    filesystem, path = pafs.FileSystem.from_uri(storage_path)
    return path, filesystem


def _with_threads(loop: Callable[[dict[str, Any]], None], threads: int
                  ) -> Callable[[dict[str, Any]], None]:
    """``loop`` with the driver's plugins installed and torch's intra-op threads set to the
    worker's whole CPUs (as the client actors do), so a worker given 2 CPUs computes on 2
    cores."""

    def threaded(config: dict[str, Any]) -> None:
        install(config.pop(PLUGINS_KEY, None))  # the driver's registrations, first
        torch.set_num_threads(threads)
        loop(config)

    return threaded


def report(metrics: Mapping[str, float], state: Mapping[str, torch.Tensor] | None) -> None:
    """``ray.train.report`` from every worker; only rank 0 attaches ``state`` as checkpoint."""
    import ray.train

    if state is None or ray.train.get_context().get_world_rank() != 0:
        ray.train.report(dict(metrics), checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dict(state), os.path.join(folder, MODEL_FILE))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_checkpoint_state(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The model state saved by :func:`report` in ``checkpoint``."""
    with checkpoint.as_directory() as folder:
        data = Path(folder, MODEL_FILE).read_bytes()
    return torch.load(io.BytesIO(data), weights_only=True)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)
