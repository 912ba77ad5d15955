"""One writer per run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.records.lock import LOCK_FILE, RunLock, RunLockError
from engine.records.storage import Storage


def test_a_second_writer_fails_naming_the_holder(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "run")
    with RunLock(storage), pytest.raises(RunLockError, match=rf"in use by PID {os.getpid()} "):
        RunLock(Storage(tmp_path / "run")).acquire()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released
    RunLock(storage).acquire().release()


def test_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "since": 0,
                                                  "host": socket.gethostname()}))
    lock = RunLock(Storage(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_storage_creates_nothing_until_written(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "not-yet")
    assert not storage.exists("config.yaml") and storage.listdir("") == []
    assert not (tmp_path / "not-yet").exists()
    storage.write_text("a/b.txt", "x")
    storage.delete_file("a/b.txt")
    storage.remove_if_empty("a")
    storage.remove_if_empty()
    assert not (tmp_path / "not-yet").exists()
