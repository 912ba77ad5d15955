"""Live reports of a Ray Train job, forwarded to the driver's progress display.

Ray Train calls a ``UserCallback`` on its controller, an actor that Ray Train pins to the
driver's node (``TrainController``, ``NodeAffinitySchedulingStrategy(soft=False)``). The
:class:`ReportFeed` callback appends rank 0's metrics of every ``ray.train.report`` as a JSON
line to a file in the driver's temporary folder; :func:`follow` tails that file from a
thread of the driver while ``trainer.fit()`` blocks and hands each row to the display
(:meth:`engine.records.progress.PipelineProgress.train_report`). Used only while a display
is open (never in a sweep trial or with ``--quiet``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ray.train import UserCallback

logger = logging.getLogger(__name__)


class ReportFeed(UserCallback):
    """Appends rank 0's metrics of each report as one JSON line to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        if not metrics:
            return
        row = {k: v for k, v in metrics[0].items() if isinstance(v, int | float)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _read_new(path: str, offset: int, on_row: Callable[[dict[str, Any]], None]) -> int:
    """Hand every complete line after ``offset`` to ``on_row``; the new offset."""
    try:
        with open(path, encoding="utf-8") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    end = data.rfind("\n") + 1
    for line in data[:end].splitlines():
        if line.strip():
            on_row(json.loads(line))
    return offset + len(data[:end].encode("utf-8"))


@contextlib.contextmanager
def follow(on_row: Callable[[dict[str, Any]], None], *,
           poll_s: float = 0.5) -> Iterator[ReportFeed]:
    """A :class:`ReportFeed` whose rows reach ``on_row`` (in the driver) while the block
    runs; the last rows are handed over before the block ends."""
    folder = tempfile.mkdtemp(prefix="umim-feed-")
    path = os.path.join(folder, "reports.jsonl")
    stop = threading.Event()
    offset = 0

    def safe(row: dict[str, Any]) -> None:
        try:
            on_row(row)
        except Exception:  # a display error must never stop a training job
            logger.debug("progress feed: a row was not shown", exc_info=True)

    def tail() -> None:
        nonlocal offset
        while not stop.wait(poll_s):
            offset = _read_new(path, offset, safe)

    thread = threading.Thread(target=tail, name="umim-train-feed", daemon=True)
    thread.start()
    try:
        yield ReportFeed(path)
    finally:
        stop.set()
        thread.join()
        offset = _read_new(path, offset, safe)
        with contextlib.suppress(OSError):
            os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
