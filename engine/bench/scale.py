"""``umim bench scale``: many virtual clients on a few actors.

One domain (PneumoniaMNIST) is split over ``clients`` clients with Dirichlet label skew,
served by ``actors`` actors (never one actor per client); reports the time to build the
shards and start the actors, rounds/s of FedAvg with every client training each round, and
the peak resident memory of the driver plus all actors.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from engine.config import ExperimentConfig, from_dict


class MemoryPeak:
    """Samples, in a thread, the memory of this process, every process it started (a local
    Ray's GCS, raylet, dashboard and workers, the actors among them) and the given pids
    (actors of a Ray this process joined).

    Two sums over those processes: ``peak`` adds their resident sets (RSS), which counts a
    page shared by several processes (libtorch's code, a forked worker's heap) once per
    process, so it over-states what they use together; ``peak_pss`` adds their proportional
    set sizes (PSS: each shared page divided among its users), which sums to the memory
    the processes really take (Linux; equal to ``peak`` elsewhere).
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.pids: set[int] = set()
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)

    def _loop(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            procs = {me.pid: me}
            with contextlib.suppress(psutil.Error):
                procs.update({p.pid: p for p in me.children(recursive=True)})
            for pid in self.pids - set(procs):
                with contextlib.suppress(psutil.Error):
                    procs[pid] = psutil.Process(pid)
            total = pss = 0
            for proc in procs.values():
                with contextlib.suppress(psutil.Error):
                    info = proc.memory_full_info()
                    total += info.rss
                    pss += getattr(info, "pss", info.rss)
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            time.sleep(interval_s)

    def __enter__(self) -> MemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def bench_scale(*, clients: int = 1000, actors: int = 2, rounds: int = 2,
                data_root: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Run FedAvg over ``clients`` virtual clients on ``actors`` actors."""
    from engine.fl.client import shard_builder
    from engine.fl.simulation import Callback, Simulation
    from engine.records.storage import Storage
    from engine.run.build import build_simulation
    from engine.run.session import Session, resolve_paths

    cfg = resolve_paths(from_dict(ExperimentConfig, {
        "name": "bench-scale",
        "data": {"domains": ["pneumonia"], "clients_per_domain": clients,
                 "partition": "dirichlet", "dirichlet_alpha": 0.5, "data_root": data_root,
                 "cache_dir": cache_dir},
        "model": {"arch": "vit", "hidden_size": 32, "mlp_dim": 64, "num_layers": 1,
                  "num_heads": 2},
        "train": {"local_epochs": 1, "batch_size": 32},
        "clients": {"num_actors": actors, "num_cpus": 1.0},
        "strategy": {"name": "fedavg", "rounds": rounds},
        "run": {"evaluate_every": 0, "checkpoint_every": rounds, "keep_checkpoints": 1}}))
    marks: list[float] = []

    class Clock(Callback):
        def on_round_end(self, sim: Simulation, server_round: int) -> None:
            marks.append(time.perf_counter())

    with MemoryPeak() as memory, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        shard_builder(cfg.data).partitions("pneumonia", clients, scheme="dirichlet",
                                           seed=cfg.seed, alpha=0.5)
        shards_s = time.perf_counter() - started
        started = time.perf_counter()
        session = Session(cfg).start()
        try:
            memory.pids = {d["pid"] for d in session.actors.describe()}
            startup_s = time.perf_counter() - started
            sim = build_simulation(cfg, Storage(Path(tmp)), session, callbacks=[Clock()])
            begin = time.perf_counter()
            sim.run()
            round_s = (marks[-1] - begin) / rounds
            described = session.actors.describe()
        finally:
            session.shutdown()
    per_actor = [len(d["clients"]) for d in described]
    return {"rows": [{"clients": clients, "actors": len(described),
                      "clients_per_actor": max(per_actor), "shards_s": shards_s,
                      "startup_s": startup_s, "seconds_per_round": round_s,
                      "rounds_per_s": 1.0 / round_s,
                      "peak_rss_gb": memory.peak / 1024**3,
                      "peak_pss_gb": memory.peak_pss / 1024**3}]}
