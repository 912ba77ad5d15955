"""What the server's unlabelled pool holds besides the MedNIST half, and how a cap cuts it.

The pool always holds the half of every MedNIST class that no client gets. Two settings add
images of the clients' own modalities (labels are never kept):

* ``share``: a seeded, label-stratified share of every client domain's official *train*
  split moves into the pool and out of that domain's train shard (so no image is both a
  client's and the pool's; val / test never change);
* ``sources``: catalog domains that are not clients, whose whole train split joins the pool.

Every pool image's id names where it came from: MedNIST ids are MedNIST's own
(``"CXR/000123.jpeg"``), the others are ``"<domain>::<id in the domain>"``
(:func:`pool_id`), so a pool shard can be described (:func:`composition`) and capped per
source (:func:`pool_subset`) from its ids alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.data.mednist import stratified_take

__all__ = ["MEDNIST_POOL", "POOL_ID_SEP", "PoolSettings", "composition", "pool_id",
           "pool_source", "pool_subset", "share_split"]

MEDNIST_POOL = "mednist"
"""The name of the MedNIST half in a pool's composition."""
POOL_ID_SEP = "::"
"""Separates the contributing domain from the sample's own id (never in a MedNIST name)."""


@dataclass(frozen=True)
class PoolSettings:
    """What joins the MedNIST half in the server's pool.

    Attributes
    ----------
    share
        Fraction in ``[0, 1)`` of each of ``domains``' train split (stratified by label)
        that moves into the pool; ``0``: none (the paper's setting).
    seed
        Seed of the share split (one stream per domain).
    domains
        The client domains whose train split gives ``share`` (an experiment's
        ``data.domains``); order does not matter.
    sources
        Domains, none of them a client, whose whole train split joins the pool.
    """

    share: float = 0.0
    seed: int = 0
    domains: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"pool share must be in [0, 1), got {self.share}")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"pool sources have duplicates: {list(self.sources)}")
        clients = sorted(set(self.sources) & set(self.domains))
        if clients:
            raise ValueError(f"pool sources {clients} are client domains; a pool source gives "
                             "all its train images to the unlabelled pool, so it cannot also "
                             "be a client")

    @property
    def is_default(self) -> bool:
        """True when the pool is the MedNIST half alone (every key as before these settings)."""
        return self.share == 0.0 and not self.sources

    def gives_share(self, name: str) -> bool:
        """Whether domain ``name`` gives part of its train split to the pool."""
        return self.share > 0.0 and name in self.domains

    def sharing_domains(self) -> list[str]:
        """The domains that give a share, sorted (the pool's order and key)."""
        return sorted(set(self.domains)) if self.share > 0.0 else []

    def source_domains(self) -> list[str]:
        """The whole-train pool sources, sorted (the pool's order and key)."""
        return sorted(self.sources)


def share_split(labels: np.ndarray, share: float, seed: int, name: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """Split a domain's train samples into the pool's share and the rest the clients keep.

    Stratified by label (rows of ``labels`` that are equal form one stratum, so multi-label
    rows are stratified by their whole label vector): per stratum, ``round(share * n)``
    samples go to the pool. The draw depends only on ``seed``, ``name`` and the labels.

    Parameters
    ----------
    labels
        ``(N, L)`` (or ``(N,)``) labels of the domain's train split, in shard order.
    share
        Fraction in ``[0, 1)``.
    seed, name
        The seed and the domain's name (each domain draws its own stream).

    Returns
    -------
    tuple
        Sorted indices of the pool's share and of the samples that stay with the clients;
        together they are ``0..N-1``, with no index in both.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"pool share must be in [0, 1), got {share}")
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0 or share == 0.0:
        return np.zeros(0, dtype=np.int64), np.arange(n)
    rows = labels.reshape(n, -1)
    strata = np.unique(rows, axis=0, return_inverse=True)[1].reshape(n)
    rng = np.random.default_rng([seed, zlib.crc32(f"pool-share/{name}".encode())])
    pool, keep = stratified_take(strata, np.arange(n), (share, 1.0 - share), rng)
    return pool.astype(np.int64), keep.astype(np.int64)


def pool_id(source: str, sample_id: str) -> str:
    """The pool id of sample ``sample_id`` of domain ``source``."""
    return f"{source}{POOL_ID_SEP}{sample_id}"


def pool_source(sample_id: str) -> str:
    """Where a pool image came from: a domain's name, or :data:`MEDNIST_POOL`."""
    head, sep, _ = str(sample_id).partition(POOL_ID_SEP)
    return head if sep else MEDNIST_POOL


def composition(ids: Sequence[str] | np.ndarray, sources: Sequence[str] = ()
                ) -> dict[str, int]:
    """Images per source among pool ids ``ids``, in order of first appearance.

    ``sources`` are listed first (with ``0`` when none of ``ids`` comes from them), so a
    domain whose share rounded to nothing is still named.
    """
    out: dict[str, int] = dict.fromkeys(sources, 0)
    for sample_id in ids:
        name = pool_source(sample_id)
        out[name] = out.get(name, 0) + 1
    return out


def _quotas(counts: np.ndarray, cap: int) -> np.ndarray:
    """Per-source sample counts summing to ``cap < counts.sum()``: one per source first
    (when ``cap`` allows), the rest proportional to what is left, by largest remainder."""
    base = np.zeros(len(counts), dtype=np.int64)
    if cap >= len(counts):
        base[:] = 1
    rest, left = counts - base, cap - int(base.sum())
    exact = left * rest / rest.sum()
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:left - int(quota.sum())]] += 1
    return base + quota


def pool_subset(ids: Sequence[str] | np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Sorted indices of the pool images kept under a cap of ``cap`` (``None``: all).

    A pool of one source (the MedNIST half alone, the default) keeps
    ``sort(default_rng(seed).choice(N, cap))``, as before pools had other sources. A pool of
    several is cut stratified by source: every source keeps at least one image when ``cap``
    allows, and the rest of the cap is shared in proportion to the sources' sizes (largest
    remainder); each source draws its own seeded stream.
    """
    n = len(ids)
    if cap is None or n <= cap:
        return np.arange(n)
    sources = np.asarray([pool_source(i) for i in ids], dtype=object)
    names = list(dict.fromkeys(sources))
    if len(names) == 1:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(n, cap, replace=False))
    members = [np.flatnonzero(sources == name) for name in names]
    quotas = _quotas(np.array([len(m) for m in members], dtype=np.int64), cap)
    parts = []
    for name, idx, quota in zip(names, members, quotas, strict=True):
        rng = np.random.default_rng([seed, zlib.crc32(f"pool-cap/{name}".encode())])
        parts.append(idx[rng.choice(len(idx), int(quota), replace=False)])
    return np.sort(np.concatenate(parts))
