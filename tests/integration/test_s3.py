"""A universal run (MIM base + distillations) into an S3 bucket, and its resume from there.

The bucket is served by moto's S3 server on localhost. The run is a ``umim run`` subprocess
with the endpoint and credentials in its environment, as a user would start it: its own
local Ray then hands that environment to every Train worker (the session's shared Ray,
started before this test, could not).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BUCKET = "umim-test"
OVERRIDES = ["data.domains=[breast,ct-region]", "data.max_train_samples=64",
             "data.max_eval_samples=32", "data.pool_size=300", "pretrain.epochs=1",
             "distill.steps=10", "distill.eval_every=5", "evaluation.finetune_epochs=0",
             "evaluation.lodo_domains=[]", "evaluation.baselines=[]",
             "strategy.local_epochs=1", "clients.num_cpus=0.5"]


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on localhost with an empty bucket; yields the environment that
    points a client at it."""
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=env["AWS_ENDPOINT_URL"],
                           allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    try:
        yield env
    finally:
        server.stop()


def _umim(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run ``umim ARGS`` in a subprocess; its output (asserting it succeeded)."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(env, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _files(fs: pafs.FileSystem, root: str) -> set[str]:
    """Every file under ``root``, relative to it."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_universal_run_into_s3_and_resume(tmp_path: Path, data_root: Path, shard_cache: Path,
                                          s3_env: dict[str, str]) -> None:
    cache = tmp_path / "cache"  # the session's shards, but no MIM base: pretraining runs
    shutil.copytree(shard_cache, cache, ignore=shutil.ignore_patterns("bases", "fits"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = {p.relative_to(cache) for p in cache.rglob("*")}
    uri = f"s3://{BUCKET}/run"
    paths = ["--data-root", str(data_root), "--cache-dir", str(cache)]
    _umim(["run", str(REPO / "experiments" / "quickstart.yaml"), *OVERRIDES, "--out", uri,
           *paths, "--quiet"], s3_env, cwd)

    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=s3_env["AWS_ENDPOINT_URL"])
    root = f"{BUCKET}/run"
    files = _files(fs, root)
    for name in ("config.yaml", "history.parquet", "results.parquet", "summary.json",
                 "progress/main.done", "base/encoder.pt", "base/meta.json"):
        assert name in files, (name, sorted(files))
    assert any(f.startswith("checkpoints/round-") for f in files), sorted(files)
    assert any(f.startswith("train/mim-") for f in files), sorted(files)  # MIM's Train job
    distil = [f for f in files if f.startswith("train/") and not f.startswith("train/mim-")]
    assert any(f.endswith("model.pt") for f in distil), sorted(files)  # a distillation's
    # nothing of the run on local disks: not in the cache (shards only), not in the cwd
    made = {p.relative_to(cache) for p in cache.rglob("*")} - before
    assert not [p for p in made if {"bases", "train", "checkpoints", "ray-train"} & set(p.parts)]
    assert not list(cwd.iterdir())

    # resume from the bucket: the main run's marker gone, the base reused from the bucket
    fs.delete_file(f"{root}/progress/main.done")
    base = fs.get_file_info(f"{root}/base/encoder.pt").mtime
    out = _umim(["resume", uri, *paths], s3_env, cwd)
    assert "progress/main.done" in _files(fs, root)
    assert fs.get_file_info(f"{root}/base/encoder.pt").mtime == base, out[-4000:]
    made = {p.relative_to(cache) for p in cache.rglob("*")} - before
    assert not [p for p in made if {"bases", "train", "checkpoints", "ray-train"} & set(p.parts)]
    assert not list(cwd.iterdir())
