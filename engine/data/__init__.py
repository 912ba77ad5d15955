"""The data plane: raw datasets -> unified, per-client Parquet shards.

Every dataset exposes the same contract, a :class:`~engine.data.sources.Source`: it turns a
``domains.yaml``-style entry into a :class:`~engine.data.spec.DomainSpec` (what the domain
is: task, label names), fingerprints its raw input, loads its raw train / val / test
splits and counts them. Built-in sources: ``medmnist`` (official MedMNIST files),
``mednist`` (MedNIST classes, split together with the server's unlabelled pool),
``folder`` (an image folder, one sub-folder per class) and ``npz`` (a private
MedMNIST-layout file); more with :func:`~engine.data.sources.register_source`, an import
path ``"pkg.mod:Class"`` or the entry-point group ``umim.sources``. A
:class:`~engine.data.prepare.ShardBuilder` unifies every source's images the same way
(``3 x 28 x 28``) and writes each domain's shards once, and a client reads only its own
shards with :func:`~engine.data.shards.read_shard`.
"""

from engine.data.catalog import MISSION_DOMAINS, domain_catalog
from engine.data.errors import DataError
from engine.data.medmnist import available_flags, load_medmnist, medmnist_spec
from engine.data.mednist import MedNISTSplitSettings, load_mednist, split_mednist
from engine.data.partition import dirichlet_partition, iid_partition, partition
from engine.data.pool import PoolSettings, pool_subset
from engine.data.prepare import POOL_OWNER, ShardBuilder
from engine.data.root import resolve_cache_dir, resolve_data_root
from engine.data.shards import Shard, ShardMeta, read_shard, write_shard
from engine.data.sources import (
    SOURCES,
    RawSplit,
    Source,
    SourceContext,
    get_source,
    known_sources,
    register_source,
)
from engine.data.spec import DomainSpec
from engine.data.summary import summarise_domains

__all__ = [
    "MISSION_DOMAINS",
    "POOL_OWNER",
    "SOURCES",
    "DataError",
    "DomainSpec",
    "MedNISTSplitSettings",
    "PoolSettings",
    "RawSplit",
    "Shard",
    "ShardBuilder",
    "ShardMeta",
    "Source",
    "SourceContext",
    "available_flags",
    "dirichlet_partition",
    "domain_catalog",
    "get_source",
    "iid_partition",
    "known_sources",
    "load_medmnist",
    "load_mednist",
    "medmnist_spec",
    "partition",
    "pool_subset",
    "read_shard",
    "register_source",
    "resolve_cache_dir",
    "resolve_data_root",
    "split_mednist",
    "summarise_domains",
    "write_shard",
]
