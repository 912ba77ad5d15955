from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from engine.records.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from engine.records.history import History
from engine.records.storage import Storage


def test_history_round_trips_and_queries(tmp_path: Path) -> None:
    h = History()
    h.add(1, "a", "val", {"auc": 0.5, "acc": 0.4}, domain="da")
    h.add(2, "a", "val", {"auc": 0.7, "acc": float("nan")}, domain="da")
    h.add(2, "", "server", {"fit_seconds": 1.5})
    back = History.from_parquet_bytes(h.to_parquet_bytes())
    assert back.records[:2] == h.records[:2] and len(back) == 5
    assert back.latest("val", "auc") == {("a", "da"): 0.7}
    assert back.latest("val", "acc") == {("a", "da"): 0.4}  # NaN is skipped
    (tmp_path / "h.parquet").write_bytes(h.to_parquet_bytes())
    table = pq.read_table(tmp_path / "h.parquet")
    assert table.column_names == ["round", "client", "domain", "phase", "metric", "value"]
    h.truncate(1)
    assert {r.round for r in h.records} == {1}
    assert History().to_table().num_rows == 0


def test_checkpoints_keep_the_newest_complete(tmp_path: Path) -> None:
    import torch

    storage = Storage(tmp_path / "run")
    assert latest_checkpoint(storage) is None
    for r in (1, 2, 3):
        h = History()
        h.add(r, "a", "fit", {"loss": float(r)})
        save_checkpoint(storage, Checkpoint(r, {"encoder": {"w": torch.full((2,), r)}}, h), keep=2)
    assert storage.listdir("checkpoints") == ["round-0002", "round-0003"]
    # a half-written newer checkpoint (no COMPLETE marker) is ignored
    storage.write_bytes("checkpoints/round-0004/state.pt", b"partial")
    ckpt = latest_checkpoint(storage)
    assert ckpt is not None and ckpt.round == 3
    assert torch.equal(ckpt.strategy["encoder"]["w"], torch.full((2,), 3))
    assert ckpt.history.records[0].value == 3.0


def test_storage_on_a_file_uri(tmp_path: Path) -> None:
    storage = Storage((tmp_path / "remote").as_uri())
    storage.write_text("a/b.txt", "hello")
    assert storage.read_text("a/b.txt") == "hello" and storage.exists("a/b.txt")
    assert storage.listdir("a") == ["b.txt"]


def test_atomic_path_keeps_the_old_file_on_error_and_leaves_no_temporaries(tmp_path: Path
                                                                           ) -> None:
    import pytest

    from engine.records.storage import atomic_path, write_atomic

    target = tmp_path / "sub" / "weights.pt"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    # two writers of the same file get different temporaries (a fixed name would collide)
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block renames last
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.pt"]
