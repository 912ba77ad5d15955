"""Reuse client updates across runs: the same instruction to the same client on the same
data and settings gives the same weights (clients are seeded per round and client), so a
sweep trains, e.g., the first-stage teachers once for every trial that shares their
settings instead of once per trial."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from engine.config import ExperimentConfig, to_dict
from engine.records.storage import write_atomic
from strategies.types import FitIns, FitRes, PoolOutputs

logger = logging.getLogger(__name__)


def _state_digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


class FitCache:
    """A folder of client updates keyed by everything that determines them.

    The key covers the client id, the data settings (domains, partition, caps, seed), the
    model and local-training settings, the device kind, and the instruction itself (the
    exact weights sent, fresh heads, config). Anything else changes the key.
    """

    def __init__(self, folder: Path, cfg: ExperimentConfig) -> None:
        self.folder = Path(folder)
        data = to_dict(cfg.data)
        data.pop("data_root", None)
        data.pop("cache_dir", None)
        self.context = json.dumps({"data": data, "model": to_dict(cfg.model),
                                   "train": to_dict(cfg.train), "seed": cfg.seed,
                                   "gpu": cfg.clients.num_gpus > 0,
                                   "torch": torch.__version__}, sort_keys=True, default=str)

    def key(self, cid: str, ins: FitIns) -> str:
        """The cache key of instruction ``ins`` to client ``cid``."""
        payload = json.dumps([self.context, cid, sorted(ins.fresh_heads),
                              sorted((k, str(v)) for k, v in ins.config.items()),
                              _state_digest(ins.state)])
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def get(self, cid: str, ins: FitIns) -> FitRes | None:
        """The cached update, or ``None``."""
        path = self.folder / f"{self.key(cid, ins)}.pt"
        if not path.exists():
            return None
        data = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
        outputs = data.get("pool_outputs")
        return FitRes(cid=cid, state=data["state"], num_examples=int(data["num_examples"]),
                      metrics={k: float(v) for k, v in data["metrics"].items()},
                      pool_scores=data.get("pool_scores"),
                      pool_outputs=None if outputs is None else PoolOutputs(
                          features=outputs["features"], logits=dict(outputs["logits"])))

    def put(self, cid: str, ins: FitIns, res: FitRes) -> None:
        """Store ``res`` (atomically: concurrent writers of the same key write the same)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.key(cid, ins)}.pt"
        buf = io.BytesIO()
        entry = {"state": res.state, "num_examples": res.num_examples, "metrics": res.metrics}
        if res.pool_scores is not None:  # asked for by the config, so part of the key
            entry["pool_scores"] = res.pool_scores
        if res.pool_outputs is not None:  # likewise (config["pool_outputs"])
            entry["pool_outputs"] = {"features": res.pool_outputs.features,
                                     "logits": dict(res.pool_outputs.logits)}
        torch.save(entry, buf)
        write_atomic(path, buf.getvalue())
