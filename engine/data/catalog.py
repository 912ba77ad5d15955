"""The domain catalog: which dataset each client domain reads and what its task is.

The eight mission domains are data (``domains.yaml`` beside this module); an experiment can
add its own under ``data.extra_domains`` in the same format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from engine.data.medmnist import medmnist_spec
from engine.data.mednist import MEDNIST_CLASSES
from strategies.types import TaskType

Source = Literal["medmnist", "mednist"]
_DOMAINS_FILE = Path(__file__).with_name("domains.yaml")


@dataclass(frozen=True)
class DomainSpec:
    """One client domain.

    Attributes
    ----------
    name
        Domain name, e.g. ``"pneumonia"``.
    source
        ``"medmnist"`` (an official ``.npz``) or ``"mednist"`` (a subset of MedNIST classes).
    dataset
        MedMNIST flag (``medmnist`` source only).
    size
        MedMNIST image size to read (28, 64, 128 or 224); everything is unified to 28.
    classes
        MedNIST classes the domain holds (``mednist`` source only), in label order.
    modality, body_part
        Free text for tables.
    task
        Task type, derived from the source.
    label_names
        Class names, derived from the source.
    """

    name: str
    source: Source
    modality: str
    body_part: str
    task: TaskType
    label_names: tuple[str, ...]
    dataset: str | None = None
    size: int = 28
    classes: tuple[str, ...] = ()

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
        if self.source == "mednist":
            return "MedNIST[" + ",".join(self.classes) + "]"
        return f"{self.dataset}@{self.size}"

    @classmethod
    def from_dict(cls, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Build a spec from a ``domains.yaml``-style entry, deriving task and labels."""
        allowed = {"source", "dataset", "size", "classes", "modality", "body_part"}
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"domain {name!r}: unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(allowed)}")
        source = entry.get("source")
        common = {"name": name, "modality": str(entry.get("modality", "")),
                  "body_part": str(entry.get("body_part", ""))}
        if source == "medmnist":
            if "dataset" not in entry or "classes" in entry:
                raise ValueError(f"domain {name!r}: a medmnist domain needs 'dataset' "
                                 "and takes no 'classes'")
            spec = medmnist_spec(str(entry["dataset"]), int(entry.get("size", 28)))
            return cls(source="medmnist", dataset=spec.flag, size=spec.size, task=spec.task,
                       label_names=spec.label_names, **common)
        if source == "mednist":
            classes = tuple(entry.get("classes", ()))
            bad = [c for c in classes if c not in MEDNIST_CLASSES]
            if len(classes) < 2 or bad or "dataset" in entry:
                raise ValueError(f"domain {name!r}: a mednist domain needs 'classes', two or "
                                 f"more of {MEDNIST_CLASSES} (got {list(classes)})")
            return cls(source="mednist", classes=classes, task="multi-class",
                       label_names=classes, **common)
        raise ValueError(f"domain {name!r}: source must be 'medmnist' or 'mednist', got {source!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for JSON and Parquet metadata)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["label_names"] = list(self.label_names)
        out["classes"] = list(self.classes)
        return out


@cache
def _default_entries() -> Mapping[str, Mapping[str, Any]]:
    with _DOMAINS_FILE.open() as fh:
        return MappingProxyType(yaml.safe_load(fh))


def domain_catalog(extra: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, DomainSpec]:
    """The eight mission domains plus ``extra`` ones (name -> entry), as :class:`DomainSpec`.

    An ``extra`` entry with the name of a built-in domain replaces it.
    """
    entries = {**_default_entries(), **(extra or {})}
    catalog = {name: DomainSpec.from_dict(name, entry) for name, entry in entries.items()}
    claimed: dict[str, str] = {}
    for spec in catalog.values():
        for c in spec.classes:
            if c in claimed:
                raise ValueError(f"MedNIST class {c!r} is claimed by domains {claimed[c]!r} "
                                 f"and {spec.name!r}; each class may belong to one domain")
            claimed[c] = spec.name
    return catalog


MISSION_DOMAINS: tuple[str, ...] = ("breast", "pneumonia", "retina", "pathology", "adrenal",
                                    "vessel", "ct-region", "mr-xr")
