"""Build client and pool shards once from the raw datasets, and find them again.

Shards go to ``<cache_dir>/shards/<owner>-<fingerprint>/<split>.parquet``; the fingerprint
covers the domain spec, its source's fingerprint of the raw input (for MedNIST: the file, the
claims of every MedNIST domain and the split settings) and the shard format, so a changed
input gives a new shard and an unchanged one is never rebuilt. What a domain's raw splits
are is up to its :class:`~engine.data.sources.Source`; every source's images go through the
same :func:`~engine.data.unify.unify_images`.

The server's pool is the MedNIST half, plus what :class:`~engine.data.pool.PoolSettings`
adds (a share of every client domain's train split, whole pool-source domains). A domain
that gives a share has its own folder (its key adds the share and seed) holding the rest of
its train split and its unchanged val / test; its full shards stay where they always were,
and with the default settings every folder and file is the same as before the settings
existed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.errors import DataError
from engine.data.medmnist import SPLITS
from engine.data.mednist import MedNISTArrays, MedNISTSplit, MedNISTSplitSettings
from engine.data.partition import PartitionScheme, partition
from engine.data.pool import (
    MEDNIST_POOL,
    PoolSettings,
    composition,
    pool_id,
    pool_subset,
    share_split,
)
from engine.data.shards import (
    SHARD_FORMAT_VERSION,
    Shard,
    ShardMeta,
    read_shard,
    read_shard_ids,
    write_shard,
)
from engine.data.sources import RawSplit, Source, SourceContext, get_source
from engine.data.sources.mednist import mednist_key, mednist_split
from engine.data.spec import DomainSpec
from engine.data.unify import normalisation_stats, unify_image_list, unify_images

__all__ = ["POOL_OWNER", "MedNISTSplitSettings", "PoolSettings", "ShardBuilder", "ShardPaths",
           "ShardRecipe"]

logger = logging.getLogger(__name__)

POOL_OWNER = "server-pool"
PARTITION_COMPLETE = "COMPLETE"  # written last into a partition's folder
ShardPaths = dict[str, Path]
"""split name -> shard file."""


def _digest(payload: object) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _unify(raw: RawSplit | tuple) -> np.ndarray:
    """The unified ``(N, 3, 28, 28)`` images of one raw split (a plain 5-tuple works too)."""
    images, _, _, spatial_dims, in_channels = raw
    unify = unify_images if isinstance(images, np.ndarray) else unify_image_list
    return unify(images, spatial_dims=spatial_dims, in_channels=in_channels)


@dataclass(frozen=True)
class ShardRecipe:
    """How to find (or build) one client's shards on whatever node it runs: a domain, or
    part ``index`` of a ``num_clients``-way partition of it."""

    domain: str
    num_clients: int = 1
    index: int = 0
    scheme: PartitionScheme = "iid"
    seed: int = 0
    alpha: float = 0.5

    def resolve(self, builder: ShardBuilder) -> ShardPaths:
        """The shard paths on this node (built now if this node has none yet)."""
        if self.num_clients == 1:
            return builder.domain(self.domain)
        return builder.partition(self.domain, self.num_clients, self.index,
                                 scheme=self.scheme, seed=self.seed, alpha=self.alpha)


def _client_paths(folder: Path, index: int) -> ShardPaths:
    return {s: folder / f"client-{index:05d}" / f"{s}.parquet" for s in SPLITS}


class ShardBuilder:
    """Writes (once) and locates the shards of domains and of the server's pool.

    Parameters
    ----------
    catalog
        Every known domain; MedNIST is split over all MedNIST domains of the catalog, so a
        domain's shard does not depend on which other domains an experiment selects.
    data_root, cache_dir
        Raw data (read only) and the folder for derived shards.
    mednist
        MedNIST split settings.
    download
        Fetch missing official files.
    pool
        What the server's pool holds besides the MedNIST half (default: nothing); the
        domains that give it a share of their train split get the rest as their train shard.

    Raises
    ------
    DataError
        When a domain named in ``pool`` is not in ``catalog``.
    """

    def __init__(self, catalog: Mapping[str, DomainSpec], data_root: Path, cache_dir: Path,
                 mednist: MedNISTSplitSettings | None = None, download: bool = True,
                 pool: PoolSettings | None = None) -> None:
        self.catalog = dict(catalog)
        self.data_root = Path(data_root)
        self.cache_dir = Path(cache_dir)
        self.mednist = mednist or MedNISTSplitSettings()
        self.download = download
        self.pool_settings = pool or PoolSettings()
        for name in (*self.pool_settings.sharing_domains(), *self.pool_settings.sources):
            self._spec(name)
        self._memo: dict[str, object] = {}
        self._partitions: dict[tuple, Path] = {}

    @property
    def context(self) -> SourceContext:
        """What the sources see of this builder (its memo is shared by every call)."""
        return SourceContext(self.catalog, self.data_root, download=self.download,
                             mednist=self.mednist, memo=self._memo)

    def source(self, name: str) -> Source:
        """The :class:`~engine.data.sources.Source` of domain ``name``."""
        return get_source(self._spec(name).source)

    # -- locations ---------------------------------------------------------------------
    def _mednist_key(self) -> list:
        return mednist_key(self.context)

    def _dir(self, owner: str, key: object) -> Path:
        return self.cache_dir / "shards" / f"{owner}-{_digest([SHARD_FORMAT_VERSION, key])}"

    def _domain_key(self, name: str) -> list:
        spec = self._spec(name)
        return [spec.to_dict(), self.source(name).fingerprint(spec, self.context)]

    def _full_dir(self, name: str) -> Path:
        """Folder of ``name``'s shards with its whole official train split."""
        return self._dir(name, self._domain_key(name))

    def _share_key(self) -> dict:
        return {"pool_share": self.pool_settings.share, "pool_seed": self.pool_settings.seed}

    def domain_dir(self, name: str) -> Path:
        """Folder of ``name``'s three shard files (the clients' ones: without the pool's
        share of the train split when ``name`` gives one)."""
        key = self._domain_key(name)
        if self.pool_settings.gives_share(name):
            key = [*key, self._share_key()]
        return self._dir(name, key)

    def pool_path(self) -> Path:
        """The server pool's shard file."""
        key: object = self._mednist_key()
        settings = self.pool_settings
        if not settings.is_default:  # the MedNIST half alone keeps its key of old
            extra: dict[str, object] = {
                "sources": [[s, self._full_dir(s).name] for s in settings.source_domains()]}
            if settings.share > 0:
                extra["share"] = [self._share_key(), [[d, self._full_dir(d).name] for d in
                                                      settings.sharing_domains()]]
            key = [key, extra]
        return self._dir(POOL_OWNER, key) / "pool.parquet"

    def _spec(self, name: str) -> DomainSpec:
        if name not in self.catalog:
            raise DataError(f"unknown domain {name!r}; known: {', '.join(self.catalog)}")
        return self.catalog[name]

    # -- building ----------------------------------------------------------------------
    def domain(self, name: str) -> ShardPaths:
        """Paths of ``name``'s train / val / test shards, building them if needed.

        When ``name`` gives the pool a share, its train shard is the rest of its official
        train split (normalised with the rest's statistics) and val / test are the official
        ones.
        """
        if not self.pool_settings.gives_share(name):
            return self._full_domain(name)
        folder = self.domain_dir(name)
        paths = {split: folder / f"{split}.parquet" for split in SPLITS}
        if all(p.exists() for p in paths.values()):
            return paths
        full = {s: read_shard(p) for s, p in self._full_domain(name).items()}
        _, keep = self._share(name, full["train"])
        if not len(keep):
            raise DataError(f"domain {name!r}: a pool share of {self.pool_settings.share} "
                            f"leaves none of its {len(full['train'])} train images to the "
                            "clients; lower the pool share")
        mean, std = normalisation_stats(full["train"].images[keep])
        logger.info("building shards of domain %s without the pool's share (%d of %d train "
                    "images kept) into %s", name, len(keep), len(full["train"]), folder)
        for split in SPLITS:
            shard = full[split]
            idx = keep if split == "train" else np.arange(len(shard))
            write_shard(paths[split], shard.subset(idx, mean=mean, std=std))
        return paths

    def _share(self, name: str, train: Shard) -> tuple[np.ndarray, np.ndarray]:
        """The pool's share of domain ``name``'s full train shard, and the rest."""
        if train.labels is None:
            raise DataError(f"domain {name!r}: its train shard has no labels")
        return share_split(train.labels, self.pool_settings.share, self.pool_settings.seed,
                           name)

    def _full_domain(self, name: str) -> ShardPaths:
        """Paths of ``name``'s shards with its whole official train split, built if needed."""
        folder = self._full_dir(name)
        paths = {split: folder / f"{split}.parquet" for split in SPLITS}
        if all(p.exists() for p in paths.values()):
            return paths
        spec = self.source(name).resolve(self._spec(name), self.context)
        logger.info("building shards of domain %s into %s", name, folder)
        raw = self._raw_domain(spec)
        missing = [s for s in SPLITS if s not in raw]
        if missing:
            raise DataError(f"domain {name!r}: source {spec.source!r} gave no {missing} split")
        images = {s: _unify(raw[s]) for s in SPLITS}
        mean, std = normalisation_stats(images["train"])
        for split in SPLITS:
            _, labels, ids, _, _ = raw[split]
            meta = ShardMeta(owner=name, split=split, task=spec.task,
                             label_names=spec.label_names, mean=mean, std=std)
            write_shard(paths[split], Shard(ids=ids, images=images[split], labels=labels,
                                            meta=meta))
        return paths

    def domains(self, names: Iterable[str]) -> dict[str, ShardPaths]:
        """:meth:`domain` for several names."""
        return {name: self.domain(name) for name in names}

    def pool(self) -> Path:
        """The server's unlabelled pool shard (labels are never written), building it if needed.

        It holds the MedNIST half, then each sharing domain's share of its train split
        (domains sorted), then each pool source's whole train split (sorted); ids of the
        latter two are ``"<domain>::<id>"`` (:func:`~engine.data.pool.pool_id`). It is
        normalised with the statistics of all of it.
        """
        path = self.pool_path()
        if path.exists():
            return path
        arrays, split = self._mednist()
        images = [unify_images(arrays.images[split.pool], spatial_dims=2, in_channels=1)]
        ids = [np.asarray([arrays.names[i] for i in split.pool], dtype=object)]
        settings = self.pool_settings
        for name in [*settings.sharing_domains(), *settings.source_domains()]:
            train = read_shard(self._full_domain(name)["train"])
            idx = (self._share(name, train)[0] if settings.gives_share(name)
                   else np.arange(len(train)))
            images.append(train.images[idx])
            ids.append(np.asarray([pool_id(name, i) for i in train.ids[idx]], dtype=object))
        all_images = images[0] if len(images) == 1 else np.concatenate(images)
        all_ids = ids[0] if len(ids) == 1 else np.concatenate(ids)
        mean, std = normalisation_stats(all_images)
        meta = ShardMeta(owner=POOL_OWNER, split="pool", task="unlabelled", label_names=(),
                         mean=mean, std=std)
        logger.info("building the server pool (%s) into %s",
                    ", ".join(f"{k}: {v}" for k, v in composition(all_ids).items()), path)
        return write_shard(path, Shard(ids=all_ids, images=all_images, labels=None, meta=meta))

    def pool_shard(self, cap: int | None = None, seed: int = 0) -> Shard:
        """The server's pool shard as every reader of it sees it (building it if needed):
        cut to ``cap`` images with ``seed`` (:func:`~engine.data.pool.pool_subset`, shard
        order kept); ``None``: the whole pool.

        MIM pretraining, the distillation and the clients' pool scores all read the pool
        through this one function, so a per-image vector of one lines up with the others.
        """
        shard = read_shard(self.pool())
        keep = pool_subset(shard.ids, cap, seed)
        return shard.subset(keep) if len(keep) < len(shard) else shard

    def pool_composition(self, cap: int | None = None, seed: int = 0) -> dict[str, int]:
        """Images per source in the server's pool (building it if needed), e.g.
        ``{"mednist": 29477, "breast": 55}``: ``"mednist"`` for the MedNIST half, then each
        sharing domain and each pool source by name (listed even when it gave none).

        Parameters
        ----------
        cap, seed
            Describe the pool as cut to ``cap`` images with ``seed``
            (:func:`~engine.data.pool.pool_subset`, as MIM and distillation cut it);
            ``None``: the whole pool.
        """
        ids = read_shard_ids(self.pool())
        settings = self.pool_settings
        names = [MEDNIST_POOL, *settings.sharing_domains(), *settings.source_domains()]
        return composition(ids[pool_subset(ids, cap, seed)], names)

    def partitions(self, name: str, num_clients: int, scheme: PartitionScheme = "iid",
                   seed: int = 0, alpha: float = 0.5) -> list[ShardPaths]:
        """Split domain ``name`` over ``num_clients`` clients, each with its own shards.

        Each split is partitioned with the same scheme and seed; every client normalises
        with statistics of its own train part, as a real hospital would. Every client gets
        at least one training sample; with more clients than val / test samples, some
        clients have empty val / test splits.
        """
        folder = self._partition_folder(name, num_clients, scheme, seed, alpha)
        return [_client_paths(folder, i) for i in range(num_clients)]

    def partition(self, name: str, num_clients: int, index: int,
                  scheme: PartitionScheme = "iid", seed: int = 0, alpha: float = 0.5
                  ) -> ShardPaths:
        """Client ``index``'s part of :meth:`partitions` (the partition is written once and
        then found in constant time, however many clients resolve it)."""
        if not 0 <= index < num_clients:
            raise DataError(f"client index {index} out of range for {num_clients} clients")
        return _client_paths(self._partition_folder(name, num_clients, scheme, seed, alpha),
                             index)

    def _partition_folder(self, name: str, num_clients: int, scheme: PartitionScheme,
                          seed: int, alpha: float) -> Path:
        key = (name, num_clients, scheme, seed, alpha)
        if key in self._partitions:  # every client of an actor resolves the same partition
            return self._partitions[key]
        folder = self.domain_dir(name) / f"{scheme}-{num_clients}-s{seed}-a{alpha:g}"
        complete = folder / PARTITION_COMPLETE
        if not complete.exists():
            out = [_client_paths(folder, i) for i in range(num_clients)]
            # a partition written before markers existed is complete when all its files are
            if not all(p.exists() for client in out for p in client.values()):
                self._write_partition(name, out, scheme, seed, alpha)
            complete.write_text(str(num_clients))  # last: a crash mid-way leaves no marker
        self._partitions[key] = folder
        return folder

    def _write_partition(self, name: str, out: list[ShardPaths], scheme: PartitionScheme,
                         seed: int, alpha: float) -> None:
        """Split domain ``name`` over ``len(out)`` clients and write their shards."""
        base = self.domain(name)
        shards = {s: read_shard(base[s]) for s in SPLITS}
        parts = {s: partition(shards[s].labels, scheme, len(out), seed, alpha,
                              min_size=1 if s == "train" or len(shards[s]) >= len(out) else 0)
                 for s in SPLITS}
        for i, client in enumerate(out):
            mean, std = normalisation_stats(shards["train"].images[parts["train"][i]])
            for s in SPLITS:
                write_shard(client[s], shards[s].subset(parts[s][i], owner=f"{name}#{i}",
                                                        mean=mean, std=std))

    def _mednist(self) -> tuple[MedNISTArrays, MedNISTSplit]:
        """All MedNIST images and the split shared by the MedNIST domains and the pool
        (loaded once per builder)."""
        return mednist_split(self.context)

    def _raw_domain(self, spec: DomainSpec) -> dict[str, RawSplit]:
        """split -> (raw images, labels (N, L), ids, spatial_dims, in_channels)."""
        return get_source(spec.source).load(spec, self.context)
