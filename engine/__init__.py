"""umim engine: runs things (data, client actors, rounds, Ray Train, Ray Tune, checkpoints).

The Python API::

    from engine.config import load_config
    import engine

    result = engine.run(load_config("experiments/quickstart.yaml"), out="runs/quick")
    result.summary["claim"]          # universal vs MIM-only, paired test
    engine.resume("runs/quick")      # after a crash

``engine.run`` / ``engine.resume`` are imported lazily, so ``import engine.data`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["resume", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "resume"):
        from engine.run import study

        return getattr(study, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
