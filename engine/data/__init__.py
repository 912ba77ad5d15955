"""The data plane: real MedMNIST / MedNIST files -> unified, per-client Parquet shards.

Every dataset exposes the same contract: a :class:`~engine.data.catalog.DomainSpec` says
what it is, a :class:`~engine.data.prepare.ShardBuilder` writes its train / val / test
shards once, and a client reads only its own shards with
:func:`~engine.data.shards.read_shard`.
"""

from engine.data.catalog import MISSION_DOMAINS, DomainSpec, domain_catalog
from engine.data.errors import DataError
from engine.data.medmnist import available_flags, load_medmnist, medmnist_spec
from engine.data.mednist import load_mednist, split_mednist
from engine.data.partition import dirichlet_partition, iid_partition, partition
from engine.data.prepare import POOL_OWNER, MedNISTSplitSettings, ShardBuilder
from engine.data.root import resolve_cache_dir, resolve_data_root
from engine.data.shards import Shard, ShardMeta, read_shard, write_shard
from engine.data.summary import summarise_domains

__all__ = [
    "MISSION_DOMAINS",
    "POOL_OWNER",
    "DataError",
    "DomainSpec",
    "MedNISTSplitSettings",
    "Shard",
    "ShardBuilder",
    "ShardMeta",
    "available_flags",
    "dirichlet_partition",
    "domain_catalog",
    "iid_partition",
    "load_medmnist",
    "load_mednist",
    "medmnist_spec",
    "partition",
    "read_shard",
    "resolve_cache_dir",
    "resolve_data_root",
    "split_mednist",
    "summarise_domains",
    "write_shard",
]
