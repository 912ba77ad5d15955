"""The official MedMNIST metadata (``medmnist.INFO``) without importing torchvision.

``import medmnist`` runs the package's ``__init__``, which imports its torchvision-based
dataset classes. We only need the metadata dictionary, so ``medmnist/info.py`` is loaded on
its own.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any


@cache
def medmnist_info() -> MappingProxyType[str, dict[str, Any]]:
    """Return ``medmnist.INFO`` (dataset flag -> metadata), read-only."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'medmnist' package (for its INFO metadata) is not installed; "
                          "run: pip install medmnist")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_umim_medmnist_info", path)
    assert info_spec is not None and info_spec.loader is not None
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return MappingProxyType(module.INFO)
