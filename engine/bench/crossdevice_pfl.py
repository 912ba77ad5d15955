"""The pfl-research row of ``umim bench crossdevice``: Apple's ``pfl`` on the same workload.

The cross-device bench (:mod:`engine.bench.crossdevice`) writes one workload folder
(:func:`read_workload` reads it) and runs every row on it; this module runs pfl 0.6.0 with its
PyTorch backend in a child process (:mod:`engine.bench.pfl_child`) and returns the wall time
of its rounds and its final global model (:func:`run_pfl`).

The child writes a simulation the way pfl's own PyTorch benchmark
(``benchmarks/image_classification/pytorch/train.py``) does: a
:class:`pfl.data.federated_dataset.FederatedDataset` with a ``make_dataset_fn`` and a user
sampler, the network wrapped in :class:`pfl.model.pytorch.PyTorchModel` (``loss`` and
``metrics`` attached to it, a fresh ``torch.optim.SGD`` per user as the local optimiser, a
central SGD with learning rate 1.0 so the averaged update lands the server on the average of
the users' weights), :class:`pfl.algorithm.FederatedAveraging` with ``NNAlgorithmParams`` and
``NNTrainHyperParams``, and a :class:`pfl.aggregate.simulate.SimulatedBackend` with
``WeightByDatapoints`` (the benchmark's ``--weight_by_samples``; pfl's default weighs every
user alike). It trains exactly what the other rows train:

- the same users per round: the user sampler replays the workload's ``sampled`` lists in
  order, and pfl's cohort size is their common length;
- the same batches: the user's dataset is built in the order the engine's client draws for
  that round (:func:`engine.fl.client.epoch_batches` with the generator seeded by
  :func:`engine.fl.client.derive_seed` of the run seed, the round and the client id), which
  pfl's own :class:`pfl.data.dataset.Dataset` then cuts into batches; ``torch.manual_seed``
  of the same seed comes first, as in the engine;
- the same update: pfl averages ``user weights - global`` weighted by sample count and the
  central step adds it back, which equals the sample-weighted average of the users' weights
  up to float rounding (``tests/unit/bench/test_crossdevice_pfl.py`` checks the final model
  against :func:`reference_fedavg`, a plain loop of the same computation).

What differs, by pfl's design:

- with ``local_epochs > 1`` pfl's in-memory ``Dataset`` iterates the same order every epoch,
  where the engine draws a new permutation per epoch, so from the second epoch the batches
  differ (the bench runs one local epoch, where they are identical; with two, the test's
  8-client workload ends up to 3e-2 away from the loop's weights, which moved 0.11);
- pfl federates only parameters (``PyTorchModel.variable_map``): buffers, e.g. BatchNorm
  statistics, stay in the one shared network and carry from user to user (pfl's benchmarks
  convert BatchNorm to GroupNorm for this reason); the child lists such buffers in
  ``result.json`` (``unfederated_buffers``) and warns;
- in its first central iteration (``iteration % evaluation_frequency == 0``) pfl evaluates
  every sampled user before and after local training (two forward passes each); that time is
  part of its wall time, and ``result.json`` keeps the time of every round (``round_s``).

Environment: pfl pins ``dp-accounting>=0.4,<0.6`` (0.5.1 pins ``attrs<24``; this venv holds
attrs 26.1), ``packaging<26`` (25.0 here today) and ``wheel<0.46``. Installed into the project
venv it would downgrade attrs under aiohttp and jsonschema and tie the venv to pfl's pins, so
it is not. :func:`create_pfl_env` instead installs pfl and the packages pip's resolver adds
for it to this venv (``pip install --dry-run pfl==0.6.0``: :data:`PFL_REQUIREMENTS`, plus
wheel, which nothing imports) with ``pip install --no-deps --target`` into a folder (about
10 MB) that the child puts in front of ``sys.path`` (``PYTHONPATH``). Everything else, torch
included, is the project's own: no second torch is downloaded, and only ``attrs`` is
shadowed (by 23.2.0, inside the ranges of its dependants), in the child alone.
``make bench-env`` or ``python -m engine.bench.crossdevice_pfl create-env`` creates it;
:func:`pfl_unavailable` says why the row cannot run and how to fix that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data import resolve_cache_dir

logger = logging.getLogger(__name__)

PFL_VERSION = "0.6.0"
PFL_REQUIREMENTS = (
    f"pfl=={PFL_VERSION}",
    "dp-accounting==0.5.1",
    "prv-accountant==0.2.0",
    "multiprocess==0.70.19",
    "dill==0.4.1",
    "dm-tree==0.1.10",
    "absl-py==1.4.0",
    "attrs==23.2.0",
)
"""pfl and the packages it needs beyond this venv's, pinned (installed with ``--no-deps``)."""

MARKER = "umim-requirements.txt"
"""The file in a finished environment that lists what was installed into it."""

WORKLOAD_KEYS = ("cids", "domain", "num_classes", "rounds", "batch_size", "lr", "momentum",
                 "weight_decay", "local_epochs", "seed", "sampled", "model")


class PflUnavailableError(ImportError):
    """pfl cannot be imported for the row here: its environment is missing or stale. An
    ``ImportError``, as if pfl were not installed, so the bench shows ``not run: <reason>``
    (the reason says which command creates the environment)."""


def default_env_dir() -> Path:
    """Where the pfl environment lives by default: ``<umim cache>/bench-envs/pfl-0.6.0``
    (the cache is ``UMIM_CACHE_DIR``, else ``~/.cache/umim/cache``)."""
    return resolve_cache_dir() / "bench-envs" / f"pfl-{PFL_VERSION}"


def create_command(env_dir: Path | None = None) -> str:
    """The shell command that creates the environment at ``env_dir``."""
    target = f" --dir {env_dir}" if env_dir is not None else ""
    return f"{sys.executable} -m engine.bench.crossdevice_pfl create-env{target}"


def pfl_unavailable(env_dir: Path | None = None) -> str | None:
    """Why the pfl row cannot run (``None``: it can): the reason and the command that fixes
    it. Looks at the folder only (pfl is never imported into this process)."""
    env_dir = Path(env_dir) if env_dir is not None else default_env_dir()
    marker = env_dir / MARKER
    if not (env_dir / "pfl" / "__init__.py").is_file() or not marker.is_file():
        return (f"pfl {PFL_VERSION} environment not found at {env_dir}; create it with "
                f"`{create_command(env_dir)}` (or `make bench-env`)")
    if marker.read_text().split() != list(PFL_REQUIREMENTS):
        return (f"the pfl environment at {env_dir} holds other pins than "
                f"{' '.join(PFL_REQUIREMENTS)}; recreate it with `{create_command(env_dir)}`")
    return None


def create_pfl_env(env_dir: Path | None = None, *, timeout_s: float = 600) -> Path:
    """Install :data:`PFL_REQUIREMENTS` into ``env_dir`` (default :func:`default_env_dir`)
    with this interpreter's pip (``--no-deps --target``); a no-op when it is already there.

    The install goes to a sibling folder first and is moved into place when it is complete,
    so a failed or interrupted install never looks like an environment.

    Raises
    ------
    RuntimeError
        When pip fails (its output's tail is in the message).
    """
    env_dir = Path(env_dir) if env_dir is not None else default_env_dir()
    if pfl_unavailable(env_dir) is None:
        return env_dir
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = env_dir.with_name(f"{env_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", "--target", str(staging), *PFL_REQUIREMENTS]
    logger.info("creating the pfl environment: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"pip could not install pfl into {env_dir}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    (staging / MARKER).write_text("\n".join(PFL_REQUIREMENTS) + "\n")
    shutil.rmtree(env_dir, ignore_errors=True)
    staging.rename(env_dir)
    return env_dir


@dataclass(frozen=True)
class Workload:
    """A cross-device workload folder as :mod:`engine.bench.crossdevice` writes it.

    Attributes
    ----------
    folder
        The folder: ``workload.json``, ``train.npz`` (``x`` float32 ``[N, C, H, W]``,
        normalised; ``y`` int64 ``[N]``; ``offsets`` int64 ``[clients + 1]``: client ``i``
        holds ``x[offsets[i]:offsets[i + 1]]``) and ``init.pt`` (the initial global state).
    spec
        ``workload.json``: client ids (index = partition id), ``domain``, ``num_classes``,
        ``rounds``, ``batch_size``, ``lr``, ``momentum``, ``weight_decay``,
        ``local_epochs``, ``seed``, ``sampled`` (the client indices of rounds 1..R) and
        ``model`` (the engine's ``model`` config section).
    """

    folder: Path
    spec: Mapping[str, Any]

    @property
    def cids(self) -> list[str]:
        return [str(c) for c in self.spec["cids"]]

    @property
    def sampled(self) -> list[list[int]]:
        return [list(map(int, r)) for r in self.spec["sampled"]]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, y, offsets)`` of ``train.npz``, checked against the client list."""
        with np.load(self.folder / "train.npz") as npz:
            x, y, offsets = npz["x"], npz["y"], npz["offsets"]
        if x.dtype != np.float32 or y.dtype != np.int64 or offsets.dtype != np.int64:
            raise ValueError(f"{self.folder}/train.npz: need x float32, y int64, offsets "
                             f"int64; got {x.dtype}, {y.dtype}, {offsets.dtype}")
        if (len(offsets) != len(self.cids) + 1 or offsets[0] != 0 or offsets[-1] != len(x)
                or len(y) != len(x) or np.any(np.diff(offsets) <= 0)):
            raise ValueError(f"{self.folder}/train.npz: offsets must rise strictly from 0 to "
                             f"len(x)={len(x)} in {len(self.cids) + 1} steps (one per client "
                             f"and the end)")
        return x, y, offsets

    def initial_state(self) -> dict[str, torch.Tensor]:
        """``init.pt``: the global model's state before round 1."""
        return torch.load(self.folder / "init.pt", weights_only=True)

    def build_model(self) -> torch.nn.Module:
        """The engine's network of this workload (:func:`engine.nn.models.build_model`),
        loaded with the initial state."""
        from engine.config import ModelConfig, from_dict
        from engine.nn.models import build_model

        net = build_model(from_dict(ModelConfig, dict(self.spec["model"]), "model"),
                          {self.spec["domain"]: int(self.spec["num_classes"])})
        net.load_state_dict(self.initial_state())
        return net


def read_workload(folder: Path) -> Workload:
    """Read and check a workload folder's ``workload.json`` (the arrays are read on use).

    Raises
    ------
    ValueError
        For a missing key or file, or a schedule that does not fit the clients: a round
        list per round, indices in range, no client twice in a round, and the same cohort
        size every round (pfl's ``train_cohort_size`` is one number).
    """
    folder = Path(folder)
    for name in ("workload.json", "train.npz", "init.pt"):
        if not (folder / name).is_file():
            raise ValueError(f"workload folder {folder} has no {name}")
    spec = json.loads((folder / "workload.json").read_text())
    missing = [k for k in WORKLOAD_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{folder}/workload.json lacks {missing}")
    workload = Workload(folder, spec)
    rounds, sampled, n = int(spec["rounds"]), workload.sampled, len(workload.cids)
    if len(sampled) != rounds or rounds < 1:
        raise ValueError(f"{folder}/workload.json: sampled has {len(sampled)} rounds, "
                         f"rounds is {rounds}")
    for r, clients in enumerate(sampled, start=1):
        if not clients or len(set(clients)) != len(clients) or min(clients) < 0 \
                or max(clients) >= n:
            raise ValueError(f"{folder}/workload.json: round {r} samples {clients[:8]}...; "
                             f"need distinct indices in [0, {n})")
    if len({len(c) for c in sampled}) != 1:
        raise ValueError(f"{folder}/workload.json: cohort sizes differ between rounds "
                         f"({sorted({len(c) for c in sampled})}); pfl needs one size")
    return workload


def run_pfl(workload_dir: Path, out_dir: Path, timeout_s: float = 3600, *,
            threads: int | None = None, device: str | None = None,
            env_dir: Path | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """pfl's FedAvg on the workload in a child process (:mod:`engine.bench.pfl_child`).

    Parameters
    ----------
    workload_dir
        A folder :func:`read_workload` accepts.
    out_dir
        Where the child writes ``state.pt``, ``pfl.log`` (its output) and ``result.json``:
        ``wall_s`` (what this returns), ``startup_s`` (from the child's launch to its first
        round: interpreter, imports, reading the workload, building the model),
        ``rounds_s`` (pfl's ``algorithm.run``, every round; ``wall_s - startup_s``),
        ``round_s`` (each central iteration's seconds), ``cpu_s`` (the child's process time
        over the rounds), ``trained`` (the partition ids pfl trained in each central
        iteration), ``peak_rss`` (the child's peak resident bytes; ``peak_cuda`` too on a
        GPU), ``threads``, ``device``, ``pfl_version`` and ``unfederated_buffers``.
    timeout_s
        Kill the child after this long.
    threads
        ``torch.set_num_threads`` in the child (default: ``workload.json``'s ``threads``
        when it has one, else 1, as one engine actor or the sequential row trains). More
        threads than free cores make torch's OpenMP workers spin: on this 2-core machine
        under load, 2 threads made pfl's rounds 7x slower than 1.
    device
        pfl's device (``PFL_PYTORCH_DEVICE``; default: pfl's choice, CUDA when visible).
    env_dir
        The pfl environment (default :func:`default_env_dir`).

    Returns
    -------
    tuple
        The wall seconds from the child's launch to the end of its last round (the rounds
        alone: ``wall_s - startup_s`` of ``result.json``) and the final global state, keyed
        as the engine's.

    Raises
    ------
    PflUnavailableError
        When the environment is missing or stale (:func:`pfl_unavailable`'s reason).
    RuntimeError
        When the child fails or times out (the tail of its log in the message).
    """
    env_dir = Path(env_dir) if env_dir is not None else default_env_dir()
    reason = pfl_unavailable(env_dir)
    if reason is not None:
        raise PflUnavailableError(reason)
    workload = read_workload(workload_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is None:
        threads = int(workload.spec.get("threads", 1))
    job = {"workload": str(workload.folder.resolve()), "out": str(out_dir.resolve()),
           "threads": threads, "launched": time.time()}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the overlay first; then this checkout (the child imports engine.*), then what was set
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(env_dir.resolve()), repo,
                                                    os.environ.get("PYTHONPATH")) if p)
    if device is not None:
        env["PFL_PYTORCH_DEVICE"] = device
    log = out_dir / "pfl.log"
    for stale in ("state.pt", "result.json"):
        (out_dir / stale).unlink(missing_ok=True)
    with log.open("w") as sink:
        try:
            proc = subprocess.run([sys.executable, "-m", "engine.bench.pfl_child",
                                   json.dumps(job)], env=env, cwd=out_dir, stdout=sink,
                                  stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"the pfl run took over {timeout_s:.0f} s (log: {log})") from err
    result = out_dir / "result.json"
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the pfl run failed (exit {proc.returncode}):\n"
                           f"{log.read_text()[-4000:]}")
    wall = float(json.loads(result.read_text())["wall_s"])
    return wall, torch.load(out_dir / "state.pt", weights_only=True)


def reference_fedavg(workload: Workload, threads: int = 1) -> dict[str, torch.Tensor]:
    """The workload's FedAvg as a plain loop (what every row must reproduce): each sampled
    client trains the global model ``local_epochs`` epochs with a fresh SGD on the engine's
    batches for (seed, round, client id); the new global model is the sample-weighted
    average of their weights (:func:`strategies.aggregate.weighted_average`)."""
    import torch.nn.functional as F

    from engine.fl.client import derive_seed, epoch_batches
    from strategies.aggregate import weighted_average

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    spec, cids = workload.spec, workload.cids
    x_all, y_all, offsets = (torch.from_numpy(a) for a in workload.arrays())
    net = workload.build_model()
    state = workload.initial_state()
    try:
        for r, clients in enumerate(workload.sampled, start=1):
            states, weights = [], []
            for i in clients:
                x, y = x_all[offsets[i]:offsets[i + 1]], y_all[offsets[i]:offsets[i + 1]]
                net.load_state_dict(state)
                seed = derive_seed(spec["seed"], r, cids[i])
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad],
                                      lr=spec["lr"], momentum=spec["momentum"],
                                      weight_decay=spec["weight_decay"])
                net.train()
                for _ in range(int(spec["local_epochs"])):
                    for idx in epoch_batches(len(y), int(spec["batch_size"]), generator):
                        loss = F.cross_entropy(net(x[idx], spec["domain"]).float(), y[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                states.append({k: v.detach().clone() for k, v in net.state_dict().items()})
                weights.append(float(len(y)))
            state = weighted_average(states, weights)
    finally:
        torch.set_num_threads(before)
    return state


def max_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between the float tensors of two states (same keys)."""
    if set(a) != set(b):
        raise ValueError(f"the states hold different keys: {sorted(set(a) ^ set(b))[:5]}")
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a
                if a[k].is_floating_point() and a[k].numel()), default=0.0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.bench.crossdevice_pfl create-env [--dir D]``: create the pfl
    environment; ``check``: say whether the row can run."""
    parser = argparse.ArgumentParser(prog="python -m engine.bench.crossdevice_pfl")
    parser.add_argument("action", choices=("create-env", "check"))
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"environment folder (default {default_env_dir()})")
    args = parser.parse_args(argv)
    if args.action == "create-env":
        print(f"pfl environment ready at {create_pfl_env(args.dir)}")
        return 0
    reason = pfl_unavailable(args.dir)
    print(reason or f"pfl {PFL_VERSION} environment ready")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
