"""Registries by name, one class for all of them: strategies (``strategies.factory``), the
engine's encoders (``engine.nn``) and data sources (``engine.data``).

A name resolves, in order, to something registered by a call (:meth:`Registry.register`),
to an import path ``"package.module:attribute"`` (imported on first use, so it resolves in
every process that can import the package: client actors, Train workers, Tune trials), or to
an entry point of the registry's group (``[project.entry-points."umim.strategies"]`` in a
package's ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def load_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {err}") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from {path!r})"
                             ) from err
    return obj


class Registry(Mapping[str, T], Generic[T]):
    """Name -> object, resolvable by import path and entry point as well.

    Parameters
    ----------
    kind
        What is registered, for messages (``"strategy"``, ``"encoder"``, ...).
    group
        The entry-point group searched for names not registered here.
    builtins
        The objects that ship with umim.
    """

    def __init__(self, kind: str, group: str, builtins: Mapping[str, T] | None = None) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = dict(builtins or {})
        self._builtin = frozenset(self._items)

    # -- Mapping -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # -- registration --------------------------------------------------------------------
    def register(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` (replacing a previous registration)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':', "
                             f"got {name!r}")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Forget a registration made by a call (built-ins stay)."""
        if name not in self._builtin:
            self._items.pop(name, None)

    def user(self) -> dict[str, T]:
        """What was registered by a call (not shipped with umim), to be installed in other
        processes (see ``engine.config.plugins``)."""
        return {k: v for k, v in self._items.items() if k not in self._builtin}

    def resolve(self, name: str) -> T:
        """The object named ``name``: registered, import path, or entry point.

        Raises
        ------
        ValueError
            Naming the registered names, when ``name`` resolves to nothing.
        """
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return load_object(name)
        for ep in entry_points(group=self.group, name=name):
            self._items[name] = ep.load()  # loaded once
            return self._items[name]
        raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)} "
                         f"(or give an import path 'package.module:name', or install a "
                         f"'{self.group}' entry point)")
