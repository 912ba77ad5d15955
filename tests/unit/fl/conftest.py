"""Clients on real shards, shared by the client tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data import ShardBuilder, domain_catalog
from engine.fl.client import ClientSpec


@pytest.fixture(scope="module")
def specs(data_root: Path, shard_cache: Path) -> dict[str, ClientSpec]:
    """Clients of breast and pathology on their real shards, and a pooled client of both."""
    builder = ShardBuilder(domain_catalog(), data_root, shard_cache, download=False)
    out = {}
    for domain in ("breast", "pathology"):
        paths = {s: str(p) for s, p in builder.domain(domain).items()}
        out[domain] = ClientSpec(domain, {domain: paths})
    out["pooled"] = ClientSpec("pooled", {d: dict(out[d].shards[d]) for d in ("breast",
                                                                              "pathology")})
    return out


@pytest.fixture(scope="module")
def spec(specs: dict[str, ClientSpec]) -> ClientSpec:
    """The breast client alone."""
    return specs["breast"]
