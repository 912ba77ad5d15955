"""The domain catalog: which dataset each client domain reads and what its task is.

The eight mission domains are data (``domains.yaml`` beside this module); an experiment can
add its own under ``data.extra_domains`` in the same format. Every entry names its
``source`` (``medmnist``, ``mednist``, ``folder``, ``npz``, a registered source, an import
path ``"pkg.mod:Class"`` or a ``umim.sources`` entry point), and that
:class:`~engine.data.sources.Source` validates the entry and builds its
:class:`~engine.data.spec.DomainSpec`. Building the catalog reads no data file: a missing
file is reported by ``umim data list`` and fails only when shards are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from engine.data.sources import Source, get_source
from engine.data.spec import DomainSpec

__all__ = ["MISSION_DOMAINS", "DomainSpec", "Source", "domain_catalog"]

_DOMAINS_FILE = Path(__file__).with_name("domains.yaml")


@cache
def _default_entries() -> Mapping[str, Mapping[str, Any]]:
    with _DOMAINS_FILE.open() as fh:
        return MappingProxyType(yaml.safe_load(fh))


def domain_catalog(extra: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, DomainSpec]:
    """The eight mission domains plus ``extra`` ones (name -> entry), as :class:`DomainSpec`.

    An ``extra`` entry with the name of a built-in domain replaces it.

    Raises
    ------
    ValueError
        Naming the domain (and key) for an unknown source, an unknown or missing key or a
        bad value, and for conflicts between domains (a MedNIST class claimed twice).
    """
    entries = {**_default_entries(), **(extra or {})}
    catalog = {str(name): DomainSpec.from_dict(str(name), entry)
               for name, entry in entries.items()}
    for source in dict.fromkeys(spec.source for spec in catalog.values()):
        get_source(source).check_catalog(catalog)
    return catalog


MISSION_DOMAINS: tuple[str, ...] = ("breast", "pneumonia", "retina", "pathology", "adrenal",
                                    "vessel", "ct-region", "mr-xr")
