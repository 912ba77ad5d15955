"""The pfl-research row of ``umim bench crossdevice``: pfl 0.6.0, installed into its own
folder from the package index (cached in pytest's cache), trains the same clients on the
same batches as a plain FedAvg loop and ends on the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bench.crossdevice_pfl import (
    MARKER,
    PFL_VERSION,
    PflUnavailableError,
    create_pfl_env,
    max_difference,
    pfl_unavailable,
    read_workload,
    reference_fedavg,
    run_pfl,
)
from engine.config import ModelConfig, from_dict
from engine.nn.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VIT = {"arch": "vit", "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}


def _write_workload(folder: Path, *, clients: int = 8, sampled: list[list[int]] | None = None,
                    local_epochs: int = 1, **overrides: object) -> Path:
    """A tiny workload folder in the bench's format: clients of 5..19 random images (so
    weighting by samples matters), 3 classes, the tiny ViT."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(5, 20, clients))]).astype(np.int64)
    n = int(offsets[-1])
    np.savez(folder / "train.npz", x=rng.standard_normal((n, 3, 28, 28)).astype(np.float32),
             y=rng.integers(0, 3, n).astype(np.int64), offsets=offsets)
    torch.manual_seed(0)
    net = build_model(from_dict(ModelConfig, TINY_VIT), {"organ": 3})
    torch.save(net.state_dict(), folder / "init.pt")
    sampled = sampled if sampled is not None else [[1, 6], [0, 6]]
    spec = {"cids": [f"client{i}" for i in range(clients)], "domain": "organ",
            "num_classes": 3, "rounds": len(sampled), "batch_size": 4, "lr": 0.05,
            "momentum": 0.9, "weight_decay": 1e-4, "local_epochs": local_epochs, "seed": 7,
            "sampled": sampled, "model": TINY_VIT, **overrides}
    (folder / "workload.json").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def pfl_env(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pfl environment, created once (``pip install --no-deps --target``, a few
    seconds) and kept in pytest's cache between sessions."""
    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("bench-envs") if cache is not None else tmp_path_factory.mktemp("envs")
    try:
        return create_pfl_env(root / f"pfl-{PFL_VERSION}")
    except RuntimeError as err:  # no package index reachable: nothing to compare with
        pytest.skip(f"pfl {PFL_VERSION} could not be installed: {str(err)[-300:]}")


def test_missing_or_stale_environment_says_how_to_create_it(tmp_path: Path) -> None:
    reason = pfl_unavailable(tmp_path / "absent")
    assert reason is not None and "create-env" in reason and str(tmp_path / "absent") in reason
    stale = tmp_path / "stale"
    (stale / "pfl").mkdir(parents=True)
    (stale / "pfl" / "__init__.py").write_text("")
    (stale / MARKER).write_text("pfl==0.5.0\n")
    assert "other pins" in (pfl_unavailable(stale) or "")
    with pytest.raises(PflUnavailableError, match="not found"):  # before reading the workload
        run_pfl(tmp_path / "workload", tmp_path / "out", env_dir=tmp_path / "absent")


def test_workload_schedules_pfl_cannot_replay_are_rejected(tmp_path: Path) -> None:
    assert read_workload(_write_workload(tmp_path / "ok")).sampled == [[1, 6], [0, 6]]
    with pytest.raises(ValueError, match="cohort sizes differ"):
        read_workload(_write_workload(tmp_path / "sizes", sampled=[[1, 6], [0]]))
    with pytest.raises(ValueError, match="distinct indices"):
        read_workload(_write_workload(tmp_path / "range", sampled=[[1, 8]]))
    with pytest.raises(ValueError, match="sampled has 1 rounds"):
        read_workload(_write_workload(tmp_path / "rounds", sampled=[[1, 2]], rounds=2))


def test_pfl_trains_what_the_sequential_loop_trains(tmp_path: Path, pfl_env: Path) -> None:
    folder = _write_workload(tmp_path / "workload")
    workload = read_workload(folder)
    wall, state = run_pfl(folder, tmp_path / "pfl", threads=1, device="cpu", env_dir=pfl_env)
    reference = reference_fedavg(workload)
    moved = max_difference(workload.initial_state(), reference)
    assert moved > 1e-3  # the rounds changed the model, so agreeing is not vacuous
    # same clients, batches and sample weighting: float rounding only (pfl averages the
    # weight differences, the loop the weights). Weighting every user alike, or pfl's
    # batches in the shard's own order, each leave differences above 1e-2 here.
    assert max_difference(state, reference) < 1e-5
    result = json.loads((tmp_path / "pfl" / "result.json").read_text())
    assert result["trained"] == workload.sampled  # pfl's own rounds, recorded as it trained
    assert result["wall_s"] == wall == pytest.approx(result["startup_s"] + result["rounds_s"])
    assert len(result["round_s"]) == 2 and result["peak_rss"] > 0
    assert result["pfl_version"] == PFL_VERSION and result["unfederated_buffers"] == []
