"""The ``mednist`` source: a subset of MedNIST's six classes, split once with the pool.

Entry key: ``classes`` (two or more MedNIST classes, in label order). All MedNIST domains of
a catalog share one seeded split with the server's unlabelled pool (see
:func:`~engine.data.mednist.split_mednist`), so each class may belong to one domain only and
a domain's shards depend on every MedNIST domain's claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.errors import DataError
from engine.data.mednist import (
    MEDNIST_CLASSES,
    MedNISTArrays,
    MedNISTSplit,
    list_mednist,
    load_mednist,
    mednist_paths,
    split_mednist,
)
from engine.data.sources.base import (
    RawSplit,
    Source,
    SourceContext,
    check_keys,
    common_fields,
    file_fingerprint,
)
from engine.data.spec import DomainSpec

SOURCE = "mednist"


def _raw_input(data_root: Path) -> Path | None:
    folder, tarball = mednist_paths(data_root)
    return folder if folder.is_dir() else tarball if tarball.exists() else None


def _input_fingerprint(path: Path) -> list:
    if path.is_dir():
        files = sorted(path.rglob("*.jpeg"))
        return [path.name, len(files), sum(f.stat().st_size for f in files)]
    return file_fingerprint(path)


def _claims(ctx: SourceContext) -> dict[str, list[str]]:
    return {n: list(s.classes) for n, s in ctx.catalog.items() if s.source == SOURCE}


def _split(ctx: SourceContext, labels: np.ndarray) -> MedNISTSplit:
    claims = {n: [MEDNIST_CLASSES.index(c) for c in classes]
              for n, classes in _claims(ctx).items()}
    return split_mednist(labels, claims, seed=ctx.mednist.seed,
                         pool_fraction=ctx.mednist.pool_fraction,
                         split_fractions=ctx.mednist.split_fractions)


def mednist_key(ctx: SourceContext) -> list:
    """The identity of the MedNIST split: raw input, claims and split settings (the key of
    every MedNIST domain's shards and of the pool's)."""
    raw = _raw_input(ctx.data_root)
    return [None if raw is None else _input_fingerprint(raw), _claims(ctx),
            ctx.mednist.seed, ctx.mednist.pool_fraction, list(ctx.mednist.split_fractions)]


def mednist_split(ctx: SourceContext) -> tuple[MedNISTArrays, MedNISTSplit]:
    """All MedNIST images and their split, loaded once per context."""
    def make() -> tuple[MedNISTArrays, MedNISTSplit]:
        arrays = load_mednist(ctx.data_root, download=ctx.download)
        return arrays, _split(ctx, arrays.labels)

    return ctx.cached("mednist.split", make)


def mednist_counts(ctx: SourceContext) -> dict[str, dict[str, int]]:
    """Split sizes of every MedNIST domain, and ``"_pool"``, from the file list only.

    Raises
    ------
    DataError
        When MedNIST is not under the data root (the same error for every caller).
    """
    def make() -> dict[str, dict[str, int]] | DataError:
        try:
            _, labels = list_mednist(ctx.data_root)
        except DataError as err:
            return err
        split = _split(ctx, labels)
        counts = {name: {s: len(idx) for s, idx in parts.items()}
                  for name, parts in split.domains.items()}
        counts["_pool"] = {"pool": len(split.pool)}
        return counts

    out = ctx.cached("mednist.counts", make)
    if isinstance(out, DataError):
        raise out
    return out


def pool_size(ctx: SourceContext) -> int | None:
    """Images in the server's unlabelled pool (``None`` without MedNIST domains or file)."""
    if not _claims(ctx):
        return None
    try:
        return mednist_counts(ctx)["_pool"]["pool"]
    except DataError:
        return None


class MedNISTSource(Source):
    """A domain holding some MedNIST classes (relabelled ``0..K-1`` in ``classes`` order)."""

    def parse(self, name: str, entry: Mapping[str, Any]) -> DomainSpec:
        """Check ``classes`` (no file is read)."""
        check_keys(name, entry, {"classes"})
        raw = entry.get("classes", ())
        classes = tuple(raw) if isinstance(raw, list | tuple) else (raw,)
        bad = [c for c in classes if c not in MEDNIST_CLASSES]
        if len(classes) < 2 or bad or len(set(classes)) != len(classes):
            raise ValueError(f"domain {name!r}: a mednist domain needs 'classes', two or "
                             f"more of {MEDNIST_CLASSES} (got {list(classes)})")
        return DomainSpec(classes=classes, task="multi-class", label_names=classes,
                          **common_fields(name, entry))

    def check_catalog(self, catalog: Mapping[str, DomainSpec]) -> None:
        """Each MedNIST class may belong to one domain."""
        claimed: dict[str, str] = {}
        for spec in catalog.values():
            if spec.source != SOURCE:
                continue
            for c in spec.classes:
                if c in claimed:
                    raise ValueError(f"MedNIST class {c!r} is claimed by domains "
                                     f"{claimed[c]!r} and {spec.name!r}; each class may "
                                     "belong to one domain")
                claimed[c] = spec.name

    def fingerprint(self, spec: DomainSpec, ctx: SourceContext) -> object:
        """The key of the shared split (:func:`mednist_key`)."""
        return mednist_key(ctx)

    def load(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, RawSplit]:
        """This domain's part of the shared split, labels in ``spec.classes`` order."""
        arrays, split = mednist_split(ctx)
        remap = {MEDNIST_CLASSES.index(c): i for i, c in enumerate(spec.classes)}
        out = {}
        for s, idx in split.domains[spec.name].items():
            labels = np.array([remap[int(v)] for v in arrays.labels[idx]], dtype=np.int64)
            ids = np.asarray([arrays.names[i] for i in idx], dtype=object)
            out[s] = RawSplit(arrays.images[idx], labels[:, None], ids, 2, 1)
        return out

    def count(self, spec: DomainSpec, ctx: SourceContext) -> dict[str, int]:
        """From the shared split of the file list (no image is decoded)."""
        return mednist_counts(ctx).get(spec.name, {})

    def describe(self, spec: DomainSpec) -> str:
        """``"MedNIST[<classes>]"``."""
        return "MedNIST[" + ",".join(spec.classes) + "]"
