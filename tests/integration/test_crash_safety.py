"""Crash safety of the whole universal pipeline: one run's driver is SIGKILLed at a random
point inside each step in turn (MIM pretraining, a stage's local training, a distillation,
a baseline, the fine-tuning evaluation; leave-one-domain-out resumes by the same step
markers and is left out to keep the suite short), resumed after every kill, and its final
results equal those of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.run.study import resume

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]
PIPELINE = [
    "data.domains=[breast,ct-region]", "data.max_train_samples=48",
    "data.max_eval_samples=32", "data.pool_size=200", "pretrain.epochs=1",
    "pretrain.batch_size=64", "strategy.local_epochs=1", "distill.steps=12",
    "distill.eval_every=6", "evaluation.finetune_epochs=1", "evaluation.seeds=[0]",
    "evaluation.lodo_domains=[]", "evaluation.baselines=[fedavg]",
    "evaluation.modes=[finetune]", "evaluation.encoders=[main,base]",
    "evaluation.baseline_rounds=2", "evaluation.equal_budgets=false", "train.local_epochs=1",
]
COMPARED = ("domains", "methods", "comparisons", "claim", "mean_test_auc")

# step -> (a file whose appearance says the step is under way, relative to the run dir or,
# with the "cache:" prefix, to the cache dir)
STEPS: dict[str, str] = {
    "pretrain": "cache:bases/ray-train",
    "stage": "checkpoints/round-0001/COMPLETE",      # round 2: the second stage's training
    "distil": "train/distill-round-0002",
    "baseline": "baselines/fedavg-seed0/checkpoints/round-0001/COMPLETE",  # in round 2
    "finetune": "progress/baseline-fedavg-seed0.done",
}
# longest random delay after a marker (else 1.5 s)
DELAY_S = {"stage": 0.3, "baseline": 0.2, "finetune": 0.1}


def _run_cli(run_dir: Path, cache: Path, data_root: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "run", str(REPO / "experiments" /
                                                          "quickstart.yaml"),
            *PIPELINE, f"data.cache_dir={cache}", "--out", str(run_dir), "--data-root",
            str(data_root), "--quiet"]


def _resume_cli(run_dir: Path, data_root: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "resume", str(run_dir), "--data-root",
            str(data_root), "--quiet"]


def _fresh_cache(shard_cache: Path, folder: Path) -> Path:
    """A cache holding the session's shards but no MIM base (so pretraining runs)."""
    folder.mkdir(parents=True)
    if (shard_cache / "shards").exists():
        shutil.copytree(shard_cache / "shards", folder / "shards")
    return folder


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float,
               timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before the step began"
            assert time.monotonic() < deadline, "the step did not begin in time"
            time.sleep(0.05)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left of that session


def _summary(run_dir: Path) -> dict:
    data = json.loads((run_dir / "summary.json").read_text())
    return {k: data[k] for k in COMPARED}


def test_sigkill_in_every_step_then_resume_gives_the_same_results(
        tmp_path: Path, data_root: Path, shard_cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    reference = tmp_path / "reference"
    subprocess.run(_run_cli(reference, _fresh_cache(shard_cache, tmp_path / "cache-ref"),
                            data_root), env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=900)
    expected = _summary(reference)

    rng = random.Random(0)
    run_dir, cache = tmp_path / "crashed", _fresh_cache(shard_cache, tmp_path / "cache")
    command = _run_cli(run_dir, cache, data_root)
    killed = []
    for step, marker in STEPS.items():
        target = cache / marker[6:] if marker.startswith("cache:") else run_dir / marker
        assert not target.exists(), f"{step} began before the previous kill"
        proc = subprocess.Popen(command, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, target.exists, delay=rng.uniform(0.0, DELAY_S.get(step, 1.5)))
        killed.append(step)
        command = _resume_cli(run_dir, data_root)
    assert not (run_dir / "progress" / "eval-finetune.done").exists(), killed
    resume(run_dir, data_root=str(data_root), quiet=True)
    assert _summary(run_dir) == expected, f"killed in {killed}: results differ"
