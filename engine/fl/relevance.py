"""Pool relevance at a client: how much each public pool image looks like its own data.

The FedAUX-style score (Hahn et al.): a one-vs-public discriminator, an L2-regularised
logistic regression on the client's frozen encoder features, separates the client's own
train images (label 1) from a seeded sample of the public pool (label 0); every pool image's
score is its sigmoid probability of being "own". The client computes it on its own node and
returns one float per *public* image (never anything about a private image); the server's
distillation weights each teacher's targets on a pool image by it (see
:mod:`strategies.distill`).

The client's own images are first put on the pool's intensity scale (:func:`renormalise`:
its shard's normalisation undone, the pool's applied), as its teacher will see pool images
in the distillation; otherwise the discriminator separates the two normalisations instead of
the two kinds of image (a CT client then scores the pool's CT images as foreign).

Deterministic: the samples are drawn from a seeded generator, and the regression is solved
by a fixed number of Newton steps in float64 on the CPU (no random initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.shards import Shard

MAX_SAMPLES = 2048
"""At most this many own and this many pool images train the discriminator (seeded
subsamples when there are more)."""

L2 = 1e-2
"""L2 penalty on the discriminator's weights (features standardised; bias not penalised)."""

NEWTON_STEPS = 25
"""Newton steps of the logistic regression (it is convex; it stops early once a step is
below ``1e-8``)."""


@dataclass(frozen=True)
class PublicPool:
    """The server's public pool as a client reads it: normalised images, in the
    distillation's order and cap, and the normalisation they were given."""

    images: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_shard(cls, shard: Shard) -> PublicPool:
        """The pool of a (capped) pool shard (:func:`engine.fl.client.read_pool`)."""
        x, _ = shard.tensors()
        return cls(images=x, mean=tuple(shard.meta.mean), std=tuple(shard.meta.std))

    def __len__(self) -> int:
        return len(self.images)


def renormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                to_mean: Sequence[float], to_std: Sequence[float]) -> torch.Tensor:
    """Images ``x`` normalised with ``(mean, std)`` per channel, normalised with
    ``(to_mean, to_std)`` instead: ``(x * std + mean - to_mean) / to_std``."""
    def col(v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    return (x * col(std) + col(mean) - col(to_mean)) / col(to_std)


def sample_rows(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subsample of ``cap`` of ``n`` items (all when ``n <= cap``)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(rng.choice(n, cap, replace=False))


def fit_discriminator(own: torch.Tensor, public: torch.Tensor, *, l2: float = L2,
                      steps: int = NEWTON_STEPS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A class-balanced logistic regression of ``own`` (1) against ``public`` (0) features.

    Minimises ``mean(softplus(-z_own)) / 2 + mean(softplus(z_public)) / 2 + l2 * |w|^2 / 2``
    with ``z = standardise(f) @ w + b`` by Newton's method, in float64.

    Parameters
    ----------
    own, public
        ``(n, D)`` and ``(m, D)`` features, ``n, m >= 1``.
    l2
        Weight penalty (``> 0`` keeps a separable problem bounded).
    steps
        Most Newton steps.

    Returns
    -------
    tuple
        ``(mean, std, coef)``: the standardisation (``(D,)`` each) and ``(D + 1,)`` weights,
        the bias last.
    """
    f = torch.cat([own, public]).double().cpu()
    y = torch.cat([torch.ones(len(own)), torch.zeros(len(public))]).double()
    sw = torch.cat([torch.full((len(own),), 0.5 / len(own)),
                    torch.full((len(public),), 0.5 / len(public))]).double()
    mean, std = f.mean(0), f.std(0, unbiased=False).clamp_min(1e-6)
    a = torch.cat([(f - mean) / std, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    penalty = torch.full((a.shape[1],), l2, dtype=f.dtype)
    penalty[-1] = 0.0
    coef = torch.zeros(a.shape[1], dtype=f.dtype)
    for _ in range(steps):
        p = torch.sigmoid(a @ coef)
        grad = a.T @ (sw * (p - y)) + penalty * coef
        hess = (a.T * (sw * p * (1 - p))) @ a + torch.diag(penalty) \
            + 1e-10 * torch.eye(a.shape[1], dtype=f.dtype)
        step = torch.linalg.solve(hess, grad)
        coef = coef - step
        if float(step.abs().max()) < 1e-8:
            break
    return mean, std, coef


def pool_relevance(own: torch.Tensor, pool: torch.Tensor, seed: int, *,
                   max_samples: int = MAX_SAMPLES, l2: float = L2) -> torch.Tensor:
    """Every pool image's probability of being the client's own kind of image.

    Parameters
    ----------
    own
        ``(n, D)`` features of the client's own train images (stay at the client).
    pool
        ``(N, D)`` features of every public pool image, in the pool's order.
    seed
        Seed of the discriminator's subsamples (``max_samples`` of each side).
    max_samples, l2
        See :data:`MAX_SAMPLES` and :data:`L2`.

    Returns
    -------
    torch.Tensor
        ``(N,)`` float32 scores in ``[0, 1]``, one per pool image.

    Raises
    ------
    ValueError
        When either side has no image.
    """
    if len(own) == 0 or len(pool) == 0:
        raise ValueError(f"pool scores need own and pool images; got {len(own)} own and "
                         f"{len(pool)} pool images")
    rng = np.random.default_rng([seed, 0xFEDA])
    own_idx = torch.from_numpy(sample_rows(len(own), max_samples, rng))
    pool_idx = torch.from_numpy(sample_rows(len(pool), max_samples, rng))
    own_cpu, pool_cpu = own.detach().cpu(), pool.detach().cpu()
    mean, std, coef = fit_discriminator(own_cpu[own_idx], pool_cpu[pool_idx], l2=l2)
    z = ((pool_cpu.double() - mean) / std) @ coef[:-1] + coef[-1]
    return torch.sigmoid(z).float().contiguous()
