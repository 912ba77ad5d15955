"""Client sampling per round, as a pure, seeded function.

A cross-device federation trains a sample of its clients each round (McMahan et al. 2017's
``C``). The sample depends only on the run seed, the round, the phase and the candidate
ids, so a resumed run, another simulator given the same ids, or a rerun samples exactly the
same clients.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientSampling:
    """How many of the candidate clients take part in a round.

    Attributes
    ----------
    fraction_fit, min_fit_clients
        Each training round samples ``max(min_fit_clients, ceil(fraction_fit * n))`` of its
        ``n`` candidates (all of them when that is ``n`` or more). ``1.0`` / ``0``: every
        candidate, every round.
    fraction_evaluate, min_evaluate_clients
        The same for the per-round federated evaluations (the final one scores every
        client).
    """

    fraction_fit: float = 1.0
    min_fit_clients: int = 0
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 0

    def __post_init__(self) -> None:
        for name in ("fraction_fit", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"strategy.{name} must be in (0, 1], got {value}")
        for name in ("min_fit_clients", "min_evaluate_clients"):
            if getattr(self, name) < 0:
                raise ValueError(f"strategy.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def samples_fit(self) -> bool:
        """Whether a training round may leave clients out."""
        return self.fraction_fit < 1.0

    def fit(self, cids: Sequence[str], *, seed: int, server_round: int) -> list[str]:
        """The clients of ``cids`` that train in round ``server_round``."""
        return sample_clients(cids, self.fraction_fit, self.min_fit_clients, seed=seed,
                              server_round=server_round, phase="fit")

    def evaluate(self, cids: Sequence[str], *, seed: int, server_round: int) -> list[str]:
        """The clients of ``cids`` that score the model after round ``server_round``."""
        return sample_clients(cids, self.fraction_evaluate, self.min_evaluate_clients,
                              seed=seed, server_round=server_round, phase="evaluate")


def sample_size(num_candidates: int, fraction: float, min_clients: int = 0) -> int:
    """How many of ``num_candidates`` clients a round samples:
    ``max(min_clients, ceil(fraction * num_candidates))``, at most all of them."""
    if num_candidates <= 0:
        return 0
    wanted = max(int(min_clients), math.ceil(fraction * num_candidates - 1e-9))
    return min(num_candidates, max(wanted, 1))


def sample_clients(cids: Sequence[str], fraction: float, min_clients: int = 0, *, seed: int,
                   server_round: int, phase: str = "fit") -> list[str]:
    """A seeded sample of ``cids`` for one round, sorted.

    The candidates are sorted first, so the result depends on the set of ids, not on their
    order; the draw (without replacement) is seeded by ``(seed, server_round, phase)``.

    Parameters
    ----------
    cids
        The candidate client ids.
    fraction, min_clients
        The sample size, :func:`sample_size`.
    seed, server_round, phase
        What the draw depends on (``phase``: ``fit`` or ``evaluate``).
    """
    pool = sorted(cids)
    k = sample_size(len(pool), fraction, min_clients)
    if k >= len(pool):
        return pool
    rng = np.random.default_rng([int(seed), int(server_round), zlib.crc32(phase.encode())])
    chosen = rng.choice(len(pool), size=k, replace=False)
    return [pool[i] for i in sorted(chosen.tolist())]
