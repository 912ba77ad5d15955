"""The registry of dataset sources: built-in, registered, imported or entry points.

An entry's ``source`` is resolved, in order, as a name in :data:`SOURCES` (the built-in
``medmnist``, ``mednist``, ``folder`` and ``npz``, plus everything given to
:func:`register_source`), an import path ``"pkg.mod:Class"``, or the name of an entry point
of the group ``umim.sources`` (a package's ``[project.entry-points."umim.sources"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from engine.data.sources.base import Source
from strategies.registry import Registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "umim.sources"
SOURCES: Registry[type[Source]] = Registry("source", ENTRY_POINT_GROUP)
"""Source name -> class (built-in and registered ones); the same registry class as the
strategies' and the encoders'."""
_REQUIRED = ("parse", "fingerprint", "resolve", "load", "count", "describe", "check_catalog")
_INSTANCES: dict[str, tuple[type, Source]] = {}


def _check_class(cls: object, where: str) -> type[Source]:
    if not isinstance(cls, type):
        raise ValueError(f"{where}: a source must be a class, got {cls!r}")
    missing = [m for m in _REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{where}: {cls.__module__}.{cls.__qualname__} is not a source: it "
                         f"lacks {missing} (subclass engine.data.sources.Source)")
    return cls  # type: ignore[return-value]


def register_source(name: str, cls: type[Source], *, replace: bool = False) -> type[Source]:
    """Make ``cls`` the source of entries with ``source: name``.

    Parameters
    ----------
    name
        The ``source`` value entries use (no ``:``, which marks import paths).
    cls
        A :class:`~engine.data.sources.Source` subclass (created with no arguments).
    replace
        Allow replacing another class already registered under ``name``.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a source name must be a non-empty string without ':', got {name!r}")
    cls = _check_class(cls, f"source {name!r}")
    if SOURCES.get(name, cls) is not cls and not replace:
        raise ValueError(f"source {name!r} is already registered ({SOURCES[name].__qualname__});"
                         " pass replace=True to replace it")
    SOURCES.register(name, cls)
    _INSTANCES.pop(name, None)
    return cls


def _entry_point_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def known_sources() -> list[str]:
    """Names of every source an entry may use (registered and entry points)."""
    return sorted(set(SOURCES) | set(_entry_point_names()))


def _lookup(name: str) -> type[Source] | None:
    """The class of ``name``; ``None`` for an unknown plain name. An import path that does
    not import is an error naming it."""
    if name not in SOURCES and ":" not in name and not entry_points(group=ENTRY_POINT_GROUP,
                                                                    name=name):
        return None
    return _check_class(SOURCES.resolve(name), f"source {name!r}")


def get_source(name: str) -> Source:
    """The source called ``name`` (see the module docstring for how it is found).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    cls = _lookup(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"source must be one of {known_sources()}, an import path "
                         f"'pkg.module:Class' or an entry point of group {ENTRY_POINT_GROUP!r};"
                         f" got {name!r}")
    cached = _INSTANCES.get(name)
    if cached is None or cached[0] is not cls:
        cached = (cls, cls())
        _INSTANCES[name] = cached
    return cached[1]


def source_of_entry(name: str, entry: Mapping[str, Any]) -> Source:
    """The source of domain ``name``'s entry, with errors that name the domain."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"domain {name!r}: an entry must be a mapping of keys, got {entry!r}")
    if "source" not in entry:
        raise ValueError(f"domain {name!r}: key 'source' is missing; source must be one of "
                         f"{known_sources()}")
    try:
        return get_source(entry["source"])
    except ValueError as err:
        raise ValueError(f"domain {name!r}: {err}") from err
