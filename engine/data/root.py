"""Where data and derived shards live on disk."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOT_ENV = "UMIM_DATA_ROOT"
CACHE_DIR_ENV = "UMIM_CACHE_DIR"


def _user_cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "umim"


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder that holds the raw datasets.

    Resolution order: the explicit ``data_root`` argument (``--data-root``), else the
    ``UMIM_DATA_ROOT`` environment variable, else ``~/.cache/umim/data`` (honouring
    ``XDG_CACHE_HOME``). The folder is expected to hold ``medmnist/*.npz`` and
    ``mednist/MedNIST.tar.gz`` (or ``mednist/MedNIST/``).
    """
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser().resolve()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return _user_cache_home() / "data"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder for derived, re-creatable files (client shards, MIM bases).

    Resolution order: ``cache_dir``, else ``UMIM_CACHE_DIR``, else ``~/.cache/umim/cache``.
    It is separate from the data root because the data root may be read-only.
    """
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return _user_cache_home() / "cache"
