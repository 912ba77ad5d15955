"""``DomainSpec``: what one client domain is (its source, task and label names).

A spec is built from a ``domains.yaml``-style entry by the entry's
:class:`~engine.data.sources.Source` (see :func:`~engine.data.catalog.domain_catalog`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from strategies.types import TaskType

# Fields written by ``to_dict`` only when they differ from these defaults, so that the
# fingerprint (and shard folder) of every spec that does not use them stays what it was.
_OMITTED_WHEN_DEFAULT: dict[str, Any] = {"path": None, "options": {}}


@dataclass(frozen=True)
class DomainSpec:
    """One client domain.

    Attributes
    ----------
    name
        Domain name, e.g. ``"pneumonia"``.
    source
        Name of the :class:`~engine.data.sources.Source` that reads it: ``"medmnist"``,
        ``"mednist"``, ``"folder"``, ``"npz"``, a registered name or ``"pkg.mod:Class"``.
    modality, body_part
        Free text for tables.
    task
        Task type (derived by the source, or given by the entry for ``folder`` / ``npz``).
    label_names
        Class names in label order (for multi-label: one name per label).
    dataset
        MedMNIST flag (``medmnist`` source only).
    size
        MedMNIST image size to read (28, 64, 128 or 224); everything is unified to 28.
    classes
        MedNIST classes the domain holds (``mednist`` source only), in label order.
    path
        File or folder of a file-based source (``folder``, ``npz``), as written in the
        entry: relative to the data root unless absolute.
    options
        Further source-specific settings as plain data (e.g. the ``folder`` split).
    """

    name: str
    source: str
    modality: str
    body_part: str
    task: TaskType
    label_names: tuple[str, ...]
    dataset: str | None = None
    size: int = 28
    classes: tuple[str, ...] = ()
    path: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def num_classes(self) -> int:
        """Number of output units a head for this domain needs."""
        return len(self.label_names)

    @property
    def num_labels(self) -> int:
        """Columns of the label array (``num_classes`` for multi-label, else 1)."""
        return self.num_classes if self.task == "multi-label" else 1

    @property
    def source_name(self) -> str:
        """Short description of the data source, e.g. ``"breastmnist@28"``."""
        from engine.data.sources.registry import get_source

        return get_source(self.source).describe(self)

    @classmethod
    def from_dict(cls, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Build a spec from a ``domains.yaml``-style entry with the entry's source.

        Raises
        ------
        ValueError
            Naming the domain and the key, for an unknown source or a bad entry.
        """
        from engine.data.sources.registry import source_of_entry

        return source_of_entry(name, entry).parse(name, entry)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for JSON, Parquet metadata and the shard fingerprint).

        ``path`` and ``options`` are left out while they hold their defaults.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["label_names"] = list(self.label_names)
        out["classes"] = list(self.classes)
        out["options"] = dict(self.options)
        for key, default in _OMITTED_WHEN_DEFAULT.items():
            if out[key] == default:
                del out[key]
        return out
