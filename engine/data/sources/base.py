"""The contract every dataset kind implements, and helpers shared by the sources.

A :class:`Source` turns a ``domains.yaml`` entry into a
:class:`~engine.data.spec.DomainSpec` (:meth:`Source.parse`, cheap and file-free),
fingerprints its raw input (:meth:`Source.fingerprint`, part of the shard folder's key),
fills in what only the data can tell (:meth:`Source.resolve`, e.g. a folder's class names),
loads the raw train / val / test splits for the :class:`~engine.data.prepare.ShardBuilder`
(:meth:`Source.load`) and counts samples without building anything (:meth:`Source.count`,
for ``umim data list``). Every source's images then go through the same
:func:`~engine.data.unify.unify_images` step.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from engine.data.errors import DataError
from engine.data.mednist import MedNISTSplitSettings
from engine.data.spec import DomainSpec
from strategies.types import TASK_TYPES, TaskType

COMMON_KEYS: frozenset[str] = frozenset({"source", "modality", "body_part"})
"""Keys every entry may carry, whatever its source."""


class RawSplit(NamedTuple):
    """One split as a source hands it to the shard builder (before unification).

    Attributes
    ----------
    images
        uint8 ``(N, S, S)`` grey, ``(N, S, S, 3)`` RGB or ``(N, S, S, S)`` volumes, as
        :func:`~engine.data.unify.unify_images` takes them; or a list of ``N`` such single
        images (without the ``N`` axis) when their sizes differ: they are unified in groups
        of equal shape and keep their order.
    labels
        int64 ``(N, L)``.
    ids
        ``(N,)`` object array of ``str``: each sample's identity in its source.
    spatial_dims, in_channels
        2 or 3; 1 or 3 (see :func:`~engine.data.unify.unify_images`).
    """

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    ids: np.ndarray
    spatial_dims: int
    in_channels: int


@dataclass
class SourceContext:
    """What a source may use besides its own spec.

    Attributes
    ----------
    catalog
        Every domain of the experiment (MedNIST splits over all its domains).
    data_root
        Folder of the raw data; relative ``path`` entries are resolved against it.
    download
        Whether an official file that is missing may be fetched.
    mednist
        The MedNIST split settings.
    memo
        Per-builder scratch space, shared by all calls made with one context (e.g. the
        MedNIST split, which every MedNIST domain and the pool read).
    """

    catalog: Mapping[str, DomainSpec]
    data_root: Path
    download: bool = True
    mednist: MedNISTSplitSettings = field(default_factory=MedNISTSplitSettings)
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``memo[key]``, made by ``make()`` on first use."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]


class Source(ABC):
    """One kind of dataset. Subclass it and register it with
    :func:`~engine.data.sources.register_source` (or name it ``"pkg.mod:Class"`` in an
    entry, or publish it under the entry-point group ``umim.sources``).

    A source is stateless: it is created with no arguments and may be shared.
    """

    @abstractmethod
    def parse(self, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Validate a ``domains.yaml``-style entry and build its spec.

        Must stay cheap; a missing data file must not fail here.

        Raises
        ------
        ValueError
            Naming the domain and the offending key.
        """

    @abstractmethod
    def fingerprint(self, spec: DomainSpec, ctx: SourceContext) -> object:
        """JSON-able identity of the raw input (``None`` when it is missing): part of the
        shard folder's key, so a changed input gets new shards."""

    @abstractmethod
    def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
        """The raw ``train`` / ``val`` / ``test`` splits of ``spec``.

        Raises
        ------
        DataError
            When the input is missing or malformed; the message names the file.
        """

    def resolve(self, spec: DomainSpec, ctx: SourceContext) -> DomainSpec:
        """The spec with what only the data can tell filled in (default: ``spec``).

        The builder writes the shard metadata (task, label names) from this; the shard
        folder's key uses the catalog's spec, so it does not depend on the data root.

        Raises
        ------
        DataError
            When the input is missing or contradicts the entry.
        """
        return spec

    def count(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, int]:
        """Samples per split, ideally without decoding images (default: :meth:`load`).

        Raises
        ------
        DataError
            When the input is missing or unreadable (``data list`` shows it as a problem).
        """
        return {s: len(raw.labels) for s, raw in self.load(spec, ctx).items()}

    def describe(self, spec: DomainSpec) -> str:
        """Short description for tables, e.g. ``"breastmnist@28"``."""
        return f"{spec.source}:{spec.path}" if spec.path else spec.source

    def check_catalog(self, catalog: Mapping[str, DomainSpec]) -> None:
        """Check constraints across the domains of this source (default: none).

        Raises
        ------
        ValueError
            When two domains conflict.
        """
        return None


# -- helpers for sources -------------------------------------------------------------------
def check_keys(name: str, entry: Mapping[str, Any], allowed: Collection[str],
               required: Collection[str] = ()) -> None:
    """Refuse unknown keys and missing required ones, naming the domain and the key."""
    allowed = set(allowed) | COMMON_KEYS
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"domain {name!r}: unknown key(s) {sorted(unknown)} for source "
                         f"{entry.get('source')!r}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"domain {name!r}: a {entry.get('source')} domain needs key(s) "
                         f"{missing}")


def common_fields(name: str, entry: Mapping[str, Any]) -> dict[str, str]:
    """``name``, ``source``, ``modality`` and ``body_part`` of an entry."""
    return {"name": name, "source": str(entry["source"]),
            "modality": str(entry.get("modality", "")),
            "body_part": str(entry.get("body_part", ""))}


def parse_task(name: str, value: object, allowed: Collection[str] = TASK_TYPES) -> TaskType:
    """A ``task`` entry, checked against ``allowed``."""
    if value not in allowed:
        raise ValueError(f"domain {name!r}: key 'task' must be one of {sorted(allowed)}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def parse_label_names(name: str, value: object, minimum: int = 1) -> tuple[str, ...]:
    """A ``label_names`` entry: a list of at least ``minimum`` distinct strings."""
    if isinstance(value, str) or not isinstance(value, list | tuple) or not all(
            isinstance(v, str | int) for v in value):
        raise ValueError(f"domain {name!r}: key 'label_names' must be a list of names, "
                         f"got {value!r}")
    names = tuple(str(v) for v in value)
    if len(names) < minimum or len(set(names)) != len(names):
        raise ValueError(f"domain {name!r}: key 'label_names' needs at least {minimum} "
                         f"distinct names, got {list(names)}")
    return names


def parse_path(name: str, value: object) -> str:
    """A ``path`` entry (kept as written; resolved later by :func:`resolve_path`)."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ValueError(f"domain {name!r}: key 'path' must be a file or folder path, "
                         f"got {value!r}")
    return str(value)


def resolve_path(spec: DomainSpec, data_root: Path) -> Path:
    """``spec.path`` as an absolute path: relative paths are under ``data_root``."""
    path = Path(spec.path or "").expanduser()
    return path if path.is_absolute() else Path(data_root) / path


def existing_path(spec: DomainSpec, data_root: Path, what: str) -> Path:
    """:func:`resolve_path`, raising a :class:`DataError` naming it when it is missing."""
    path = resolve_path(spec, data_root)
    if not path.exists():
        raise DataError(f"domain {spec.name!r}: {what} {path} does not exist (key 'path': "
                        f"{spec.path!r}; relative paths are under the data root {data_root})")
    return path


def file_fingerprint(path: Path) -> list:
    """Name, size and modification time of a file (the shard key of a raw input file)."""
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def files_fingerprint(root: Path, files: list[Path]) -> list:
    """Name, file count and a digest of every file's relative path, size and mtime."""
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                 .encode())
    return [root.name, len(files), h.hexdigest()[:16]]
