"""Per-round checkpoints of a run: strategy state and history, written last-marker-last."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.records.history import History
from engine.records.storage import Storage

CHECKPOINTS = "checkpoints"


@dataclass
class Checkpoint:
    """The state after round ``round``."""

    round: int
    strategy: dict[str, Any]
    history: History
    extra: dict[str, Any] = field(default_factory=dict)
    """The round loop's own state (e.g. the best-on-val model so far)."""


def _name(server_round: int) -> str:
    return f"{CHECKPOINTS}/round-{server_round:04d}"


def save_checkpoint(storage: Storage, checkpoint: Checkpoint, keep: int = 2) -> str:
    """Write ``checkpoint`` and prune all but the ``keep`` newest complete ones.

    The ``COMPLETE`` marker is written last, so a crash mid-write leaves no half checkpoint
    that :func:`latest_checkpoint` would pick.
    """
    rel = _name(checkpoint.round)
    buf = io.BytesIO()
    torch.save({"round": checkpoint.round, "strategy": checkpoint.strategy,
                "extra": checkpoint.extra}, buf)
    storage.write_bytes(f"{rel}/state.pt", buf.getvalue())
    storage.write_bytes(f"{rel}/history.parquet", checkpoint.history.to_parquet_bytes())
    storage.write_text(f"{rel}/COMPLETE", json.dumps({"round": checkpoint.round}))
    complete = _complete_rounds(storage)
    for old in complete[:-keep] if keep > 0 else []:
        storage.delete_dir(_name(old))
    return storage.path(rel)


def _complete_rounds(storage: Storage) -> list[int]:
    rounds = []
    for name in storage.listdir(CHECKPOINTS):
        if name.startswith("round-") and storage.exists(f"{CHECKPOINTS}/{name}/COMPLETE"):
            rounds.append(int(name.split("-", 1)[1]))
    return sorted(rounds)


def latest_checkpoint(storage: Storage) -> Checkpoint | None:
    """The newest complete checkpoint, or ``None``."""
    rounds = _complete_rounds(storage)
    if not rounds:
        return None
    rel = _name(rounds[-1])
    payload = torch.load(io.BytesIO(storage.read_bytes(f"{rel}/state.pt")), weights_only=True)
    history = History.from_parquet_bytes(storage.read_bytes(f"{rel}/history.parquet"))
    return Checkpoint(round=int(payload["round"]), strategy=payload["strategy"], history=history,
                      extra=dict(payload.get("extra") or {}))
