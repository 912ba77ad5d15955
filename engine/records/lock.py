"""One writer per run directory: an exclusive lock file naming its holder.

The lock is taken before anything else of a run is written; a second run (or resume) into
the same folder fails at once, naming the holder's host and PID. A lock whose holder is a
dead process on this host is stale and taken over (with a warning). On object stores
(``s3://``) the check is best-effort (no atomic create-if-absent there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from types import TracebackType

from engine.records.storage import Storage

logger = logging.getLogger(__name__)

LOCK_FILE = ".umim.lock"


class RunLockError(RuntimeError):
    """The run directory is in use by another umim process."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The exclusive lock of ``storage``'s run directory (a context manager)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.held = False
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockError` naming its holder."""
        text = json.dumps(self.info)
        if self.storage.is_local:
            path = self.storage.path(LOCK_FILE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    self._check_holder(path)
                    continue  # the holder was stale and is gone: try once more
                with os.fdopen(fd, "w") as out:
                    out.write(text)
                self.held = True
                return self
            raise RunLockError(f"{self.storage.uri} is locked ({path}); try again")
        if self.storage.exists(LOCK_FILE):
            self._raise(json.loads(self.storage.read_text(LOCK_FILE)))
        self.storage.write_text(LOCK_FILE, text)
        self.held = True
        return self

    def _check_holder(self, path: str) -> None:
        try:
            with open(path) as src:
                holder = json.loads(src.read() or "{}")
        except (OSError, ValueError):
            holder = {}
        pid = int(holder.get("pid", 0) or 0)
        if holder.get("host") == self.info["host"] and pid and not _alive(pid):
            logger.warning("taking over the stale lock of PID %d (no longer running) on %s",
                           pid, self.storage.uri)
            os.unlink(path)
            return
        self._raise(holder)

    def _raise(self, holder: dict) -> None:
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
        raise RunLockError(
            f"{self.storage.uri} is in use by PID {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} (since {when}); wait for it to finish or stop it, "
            "or choose another --out")

    def release(self) -> None:
        """Give the lock back (only when held)."""
        if not self.held:
            return
        path = self.storage.path(LOCK_FILE)
        if self.storage.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            self.storage.fs.delete_file(path)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
