"""Dataset sources: one :class:`Source` per kind of dataset, behind one registry.

Built in: ``medmnist`` (official MedMNIST files), ``mednist`` (MedNIST classes, split with
the server's pool), ``folder`` (an image folder per class) and ``npz`` (a private
MedMNIST-layout file). More kinds: :func:`register_source`, an import path
``"pkg.mod:Class"`` as an entry's ``source``, or the entry-point group ``umim.sources``.
"""

from engine.data.sources.base import RawSplit, Source, SourceContext
from engine.data.sources.folder import FolderSource
from engine.data.sources.medmnist import MedMNISTSource
from engine.data.sources.mednist import MedNISTSource
from engine.data.sources.npz import NpzSource
from engine.data.sources.registry import (
    ENTRY_POINT_GROUP,
    SOURCES,
    get_source,
    known_sources,
    register_source,
)

BUILTIN_SOURCES: dict[str, type[Source]] = {
    "medmnist": MedMNISTSource,
    "mednist": MedNISTSource,
    "folder": FolderSource,
    "npz": NpzSource,
}
for _name, _cls in BUILTIN_SOURCES.items():
    register_source(_name, _cls)

__all__ = [
    "BUILTIN_SOURCES",
    "ENTRY_POINT_GROUP",
    "SOURCES",
    "FolderSource",
    "MedMNISTSource",
    "MedNISTSource",
    "NpzSource",
    "RawSplit",
    "Source",
    "SourceContext",
    "get_source",
    "known_sources",
    "register_source",
]
