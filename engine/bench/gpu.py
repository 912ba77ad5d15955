"""``umim bench gpu``: one command that checks, on a GPU machine, that runs are true on the
hardware they are for; it prints one table of what passed and what failed, with timings.

What to run on a GPU machine (a checkout of this repository, installed with its test tools,
``pip install -e '.[dev]'``, and the data)::

    export UMIM_DATA_ROOT=/path/to/data        # medmnist/*.npz and mednist/
    umim bench gpu                              # the five checks; exit 0 iff all passed
    umim bench gpu --json > gpu-checks.json     # the same, as one JSON document
    umim bench gpu --only pytest,mim-distill    # some of them

The checks, in this order (a failed check is a row of the table, never the end of the run):

``pytest``
    ``python -m pytest tests/gpu -q`` in a subprocess: packed actors see the GPU, the
    client trains in bf16, MIM under CUDA autocast, distillation on CUDA. On a GPU a
    skipped test is a failure.
``federated``
    A packed-actor federated run through the Python API: ``experiments/fedavg_8domains.yaml``
    (FedAvg on the eight domains) on 8 actors of ``clients.num_gpus=0.125`` each, with
    ``train.precision=bf16``.
``mim-distill``
    A slice of ``experiments/paper.yaml`` (its ViT-Tiny and settings): MIM pretraining with
    ``pretrain.use_gpu`` and one universal round distilled with ``distill.use_gpu``, on two
    domains, a few epochs and steps. The slice's base is trained afresh: its cached copy is
    removed first.
``bench-fedavg``
    ``umim bench fedavg --clients 8 --rounds 2 --local-epochs 5 --batch-size 128`` (the
    reference workload) in a subprocess; it fails when the methods' accuracies disagree.
``bench-crossdevice``
    ``umim bench crossdevice --clients 1000 --per-round 50 --rounds 10`` with the rows
    sequential, umim, umim-fused, umim-per-client and flower (and pfl when its
    environment exists) in a subprocess: the GPU rows of docs/performance.md; it fails when
    a row trained other clients or its weights or accuracy disagree.

Without CUDA the command refuses (one line, exit 2). ``--force-cpu`` runs a tiny version of
the same five checks on the CPU with ``train.precision=bf16`` (``umim bench fedavg`` keeps its
``auto``: float32 there), to test the command itself; ``tests/gpu`` is then skipped, which
passes. It takes a few minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.cluster.resources import ResourceError

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CHECKS = ("pytest", "federated", "mim-distill", "bench-fedavg", "bench-crossdevice")
TINY_VIT = ["model.hidden_size=16", "model.mlp_dim=32", "model.num_layers=1",
            "model.num_heads=2"]


class CheckFailedError(AssertionError):
    """A check ran and found something false (its message is the table's detail)."""


@dataclass(frozen=True)
class Where:
    """Where and how the checks run: the data paths and the tiny CPU mode."""

    data_root: str | None = None
    cache_dir: str | None = None
    force_cpu: bool = False


def refusal(force_cpu: bool) -> str | None:
    """Why the checks cannot run here (``None``: they can)."""
    if force_cpu or torch.cuda.is_available():
        return None
    return ("no CUDA device is visible (torch.cuda.is_available() is False): run it on a GPU "
            "machine, or pass --force-cpu for a tiny version of the checks on the CPU")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailedError(message)


@contextlib.contextmanager
def _own_ray() -> Iterator[None]:
    """Shuts down a local Ray that the block started (each check starts its own, with or
    without the dashboard that Ray Train needs)."""
    import ray

    fresh = not ray.is_initialized()
    try:
        yield
    finally:
        if fresh and ray.is_initialized():
            ray.shutdown()


def _subprocess(args: Sequence[str], where: Where, timeout_s: float
                ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if where.data_root:
        env["UMIM_DATA_ROOT"] = where.data_root
    if where.cache_dir:
        env["UMIM_CACHE_DIR"] = where.cache_dir
    try:
        return subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as err:
        raise CheckFailedError(f"timed out after {timeout_s:g} s: {' '.join(args[2:])}") from err


def _last_line(text: str) -> str:
    lines = [line.strip(" =") for line in text.splitlines() if line.strip(" =")]
    return lines[-1] if lines else ""


def check_pytest(where: Where) -> str:
    """``pytest tests/gpu -q`` in a subprocess (every test must pass, none skip on a GPU)."""
    folder = REPO / "tests" / "gpu"
    _require(folder.is_dir(), f"{folder} not found: run the command from a checkout")
    proc = _subprocess([sys.executable, "-m", "pytest", str(folder), "-q",
                        "-p", "no:cacheprovider"], where, 1200)
    last = _last_line(proc.stdout)
    _require(proc.returncode == 0, f"exit {proc.returncode}: {last or _last_line(proc.stderr)}")
    _require(where.force_cpu or "skipped" not in last, f"tests skipped on a GPU: {last}")
    return last


def _load(name: str, overrides: list[str]) -> Any:
    from engine.config import load_config

    return load_config(REPO / "experiments" / name, overrides)


def _federated_overrides(force_cpu: bool) -> list[str]:
    if force_cpu:
        return ["train.precision=bf16", "clients.num_actors=2", "clients.num_gpus=0",
                "strategy.rounds=1", "data.max_train_samples=32", "data.max_eval_samples=32",
                *TINY_VIT]
    return ["train.precision=bf16", "clients.num_actors=8", "clients.num_gpus=0.125",
            "strategy.rounds=2"]


def check_federated(where: Where) -> str:
    """FedAvg on the eight domains, 8 packed actors of 0.125 GPU, bf16 (Python API)."""
    from engine.run.study import run

    cfg = _load("fedavg_8domains.yaml", _federated_overrides(where.force_cpu))
    with tempfile.TemporaryDirectory() as tmp, _own_ray():
        summary = run(cfg, out=Path(tmp) / "run", data_root=where.data_root,
                      cache_dir=where.cache_dir, quiet=True).summary
    _require(not summary["failures"], f"client failures: {summary['failures'][:2]}")
    _require(summary["rounds"] == cfg.strategy.rounds, f"ran {summary['rounds']} rounds")
    auc = summary["mean_test_auc"]
    _require(math.isfinite(auc), "the mean test AUC is not a number")
    return (f"{len(cfg.data.domains)} clients on {cfg.clients.num_actors} actors x "
            f"{cfg.clients.num_gpus:g} GPU, {cfg.train.precision}, rounds: {summary['rounds']}, "
            f"{summary['fit_samples_per_s'] or 0:,.0f} samples/s, mean test AUC {auc:.3f}")


def _slice_overrides(force_cpu: bool) -> list[str]:
    common = ["data.domains=[breast,pneumonia]", "strategy.num_stages=1",
              "strategy.rounds_per_stage=1", "strategy.local_epochs=1",
              "evaluation.finetune_epochs=0", "evaluation.lodo_domains=[]",
              "evaluation.baselines=[]", "evaluation.encoders=[main,base]",
              "clients.num_actors=2"]
    if not force_cpu:
        return [*common, "clients.num_gpus=0.1", "pretrain.epochs=2", "data.pool_size=4096",
                "data.max_train_samples=1024", "data.max_eval_samples=512",
                "distill.steps=100", "distill.eval_every=50"]
    return [*common, *TINY_VIT, "clients.num_gpus=0", "clients.num_cpus=0.5",
            "train.precision=bf16", "train.local_epochs=1", "pretrain.use_gpu=false",
            "distill.use_gpu=false", "pretrain.epochs=2", "pretrain.batch_size=64",
            "pretrain.decoder_hidden_size=16", "pretrain.decoder_mlp_dim=32",
            "pretrain.decoder_num_layers=1", "pretrain.decoder_num_heads=2",
            "data.pool_size=256", "data.max_train_samples=32", "data.max_eval_samples=32",
            "distill.steps=4", "distill.eval_every=2", "distill.batch_size=32"]


def _forget_base(cfg: Any, where: Where) -> None:
    """Remove the slice's cached MIM base, so that the check trains it."""
    from engine.fl.client import shard_builder
    from engine.run.session import resolve_paths
    from engine.train.mim import base_fingerprint

    cfg = resolve_paths(cfg, where.data_root, where.cache_dir)
    builder = shard_builder(cfg.data)
    pool = builder.pool()
    for precision in {"auto", cfg.train.precision}:
        folder = builder.cache_dir / "bases" / base_fingerprint(
            cfg.model, cfg.pretrain, pool, cfg.data.pool_size, cfg.seed, precision)
        shutil.rmtree(folder, ignore_errors=True)


def check_mim_distill(where: Where) -> str:
    """A slice of ``experiments/paper.yaml``: MIM and a distillation on Ray Train, on the GPU."""
    from engine.run.study import run

    cfg = _load("paper.yaml", _slice_overrides(where.force_cpu))
    _forget_base(cfg, where)
    with tempfile.TemporaryDirectory() as tmp, _own_ray():
        out = Path(tmp) / "run"
        summary = run(cfg, out=out, data_root=where.data_root, cache_dir=where.cache_dir,
                      quiet=True).summary
        curves = json.loads((out / "distill_curves.json").read_text())
    base = summary["base"]
    _require(base.get("cached") is False, "the MIM base came from the cache, not trained")
    mim = [row["mim_loss"] for row in base["curve"]]
    _require(len(mim) == cfg.pretrain.epochs and all(map(math.isfinite, mim)),
             f"MIM loss curve {mim}")
    rows = [row for curve in curves.values() for row in curve]
    _require(bool(rows) and all(math.isfinite(r["loss"]) for r in rows),
             "the distillation curve is empty or not finite")
    _require(not summary["failures"], f"client failures: {summary['failures'][:2]}")
    auc = summary["mean_test_auc"]
    _require(math.isfinite(auc), "the mean test AUC is not a number")
    return (f"MIM {len(mim)} epochs (loss {mim[0]:.3f} -> {mim[-1]:.3f}), distilled "
            f"{rows[-1]['step']:.0f} steps (agreement {rows[-1]['best_agreement']:.2f}), "
            f"mean test AUC {auc:.3f}")


def check_bench_fedavg(where: Where) -> str:
    """``umim bench fedavg`` at the reference size in a subprocess; its methods must agree."""
    size = (["--clients", "2", "--rounds", "1", "--local-epochs", "1", "--batch-size", "16",
             "--samples-per-client", "32", "--arch", "vit", "--methods", "sequential,engine"]
            if where.force_cpu else
            ["--clients", "8", "--rounds", "2", "--local-epochs", "5", "--batch-size", "128"])
    paths = [*(["--data-root", where.data_root] if where.data_root else []),
             *(["--cache-dir", where.cache_dir] if where.cache_dir else [])]
    proc = _subprocess([sys.executable, "-m", "engine.cli", "bench", "fedavg", *size, *paths,
                        "--json"], where, 600 if where.force_cpu else 3600)
    lines = proc.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    _require(bool(starts), f"exit {proc.returncode}: {_last_line(proc.stderr)}")
    out = json.loads("\n".join(lines[starts[-1]:]))
    _require(proc.returncode == 0 and out["accuracy_agrees"] is not False,
             f"exit {proc.returncode}; accuracy agrees: {out['accuracy_agrees']}")
    rates = ", ".join(f"{r['method']} {r['samples_per_s']:,.0f}/s" for r in out["rows"])
    return f"samples/s: {rates}; accuracies agree: {out['accuracy_agrees']}"


def check_bench_crossdevice(where: Where) -> str:
    """``umim bench crossdevice`` in a subprocess; its rows must agree."""
    from engine.bench.crossdevice_pfl import pfl_unavailable

    pfl = [] if pfl_unavailable() else ["pfl"]
    size = (["--clients", "40", "--per-round", "4", "--rounds", "2", "--samples-per-client",
             "32", "--rows", "sequential,umim"] if where.force_cpu else
            ["--clients", "1000", "--per-round", "50", "--rounds", "10", "--rows",
             ",".join(["sequential", "umim", "umim-fused", "umim-per-client", "flower",
                       *pfl])])
    paths = [*(["--data-root", where.data_root] if where.data_root else []),
             *(["--cache-dir", where.cache_dir] if where.cache_dir else [])]
    proc = _subprocess([sys.executable, "-m", "engine.cli", "bench", "crossdevice", *size,
                        *paths, "--json"], where, 900 if where.force_cpu else 3600)
    lines = proc.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    _require(bool(starts), f"exit {proc.returncode}: {_last_line(proc.stderr)}")
    out = json.loads("\n".join(lines[starts[-1]:]))
    _require(proc.returncode == 0 and out["passed"],
             f"exit {proc.returncode}; failures: {out.get('failures')}")
    rates = ", ".join(f"{r['method']} {r['rounds_per_s']:.3g} rounds/s"
                      for r in out["rows"] if r.get("rounds_per_s") is not None)
    return f"{rates}; rows agree"


CHECK_FUNCTIONS: dict[str, Callable[[Where], str]] = {
    "pytest": check_pytest, "federated": check_federated, "mim-distill": check_mim_distill,
    "bench-fedavg": check_bench_fedavg, "bench-crossdevice": check_bench_crossdevice}


def run_checks(names: Sequence[str], where: Where,
               functions: dict[str, Callable[[Where], str]] | None = None
               ) -> list[dict[str, Any]]:
    """Run the named checks in turn; one table row each (a failure is a row, not an end)."""
    functions = functions or CHECK_FUNCTIONS
    rows = []
    for name in names:
        logger.info("bench gpu: %s", name)
        started = time.perf_counter()
        try:
            detail, passed = functions[name](where), True
        except Exception as err:  # every failure is reported, the next check still runs
            logger.warning("bench gpu: %s failed", name, exc_info=True)
            message = " ".join(str(err).split())[:300]
            detail = message if isinstance(err, CheckFailedError) else (
                f"{type(err).__name__}: {message}")
            passed = False
        rows.append({"check": name, "result": "passed" if passed else "FAILED",
                     "wall_s": time.perf_counter() - started, "detail": detail})
    return rows


def bench_gpu(*, force_cpu: bool = False, only: Sequence[str] | None = None,
              data_root: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Run the GPU checks (see the module docstring) and return their rows.

    Raises
    ------
    ResourceError
        Without CUDA, unless ``force_cpu``.
    ValueError
        For a name in ``only`` that is not a check.
    """
    reason = refusal(force_cpu)
    if reason is not None:
        raise ResourceError(reason)
    names = tuple(only or CHECKS)
    unknown = [n for n in names if n not in CHECK_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; the checks: {list(CHECKS)}")
    rows = run_checks(names, Where(data_root, cache_dir, force_cpu))
    return {"rows": rows, "passed": all(r["result"] == "passed" for r in rows),
            "mode": "cpu (--force-cpu, bf16)" if force_cpu else "cuda"}
