"""Split one dataset over many clients: IID or Dirichlet label skew, seeded.

Every function returns one index array per client; together they cover every sample
exactly once.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PartitionScheme = Literal["iid", "dirichlet"]


def iid_partition(num_samples: int, num_clients: int, seed: int, min_size: int = 1
                  ) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` and deal it into ``num_clients`` near-equal parts.

    With ``min_size=0`` more clients than samples is allowed (some parts are empty).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_samples < num_clients * min_size:
        raise ValueError(f"cannot give {num_clients} clients {min_size} sample(s) each from "
                         f"{num_samples}")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by Dirichlet(``alpha``) shares.

    Small ``alpha`` gives strong skew, large ``alpha`` approaches IID. The class-by-client
    share matrix is drawn first from ``seed``, so splits of the same label space with the
    same seed (e.g. train and test) get the same skew. Clients left with fewer than
    ``min_size`` samples are topped up from the largest clients, so none is empty.
    """
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients "
                         f"{min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    shares = rng.dirichlet(np.full(num_clients, alpha), size=int(classes.max()) + 1)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        members = members[rng.permutation(len(members))]
        cuts = (np.cumsum(shares[cls])[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        while len(parts[client]) < min_size:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(labels: np.ndarray, scheme: PartitionScheme, num_clients: int, seed: int,
              alpha: float = 0.5, min_size: int = 1) -> list[np.ndarray]:
    """Dispatch to :func:`iid_partition` or :func:`dirichlet_partition`."""
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed, min_size)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size)
    raise ValueError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
