"""The vocabulary shared by strategies and the engine that runs them.

Only plain Python, NumPy and torch types live here; nothing imports Ray.
"""

from __future__ import annotations

from typing import Literal, get_args

TaskType = Literal["binary", "multi-class", "ordinal", "multi-label"]
"""A client's task, as announced at onboarding. Ordinal is scored as multi-class."""

TASK_TYPES: tuple[str, ...] = get_args(TaskType)
