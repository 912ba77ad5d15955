"""The Ray Train report feed: rows written by the callback (on the controller) reach the
driver's display while the job runs and before the block ends (no Ray cluster needed)."""

from __future__ import annotations

import time
from typing import Any

from engine.train.feed import ReportFeed, follow


def test_reports_reach_the_driver_live_and_at_the_end() -> None:
    rows: list[dict[str, Any]] = []
    with follow(rows.append, poll_s=0.05) as feed:
        assert isinstance(feed, ReportFeed)
        feed.after_report(None, [{"step": 25, "agreement": 0.9, "tag": "x"}, {"step": 25}],
                          None)
        deadline = time.monotonic() + 5
        while not rows and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rows == [{"step": 25, "agreement": 0.9}]  # rank 0's numbers, while running
        feed.after_report(None, [{"step": 50, "agreement": 0.95}], None)
        feed.after_report(None, [], None)
    assert rows[-1] == {"step": 50, "agreement": 0.95} and len(rows) == 2
