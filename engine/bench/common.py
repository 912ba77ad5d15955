"""What the benchmarks share: timing, tables, the device facts."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

LEFT = ("method", "workers", "check", "result", "detail")
"""Columns of words, aligned left (numbers align right)."""


def machine() -> dict[str, Any]:
    """Facts about where the benchmark ran."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """Print ``rows`` as a rich table, or everything as one JSON document."""
    if as_json:
        print(json.dumps({"title": title, "rows": list(rows), **(extra or {})}, indent=2,
                         default=float))
        return
    table = Table(title=title)
    for col in columns:
        # long names wrap at their underscores instead of being cut to the same prefix
        table.add_column(col.replace("_", " "), overflow="fold",
                         justify="left" if col in LEFT else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    console = Console(width=max(Console().width, 130))
    console.print(table)
    for key, value in (extra or {}).items():
        console.print(f"{key}: {value}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
