"""DP-SGD for client training (``privacy.dp``): the plan, the client's step, the ledger.

The mechanism is Opacus's DP-SGD: every step draws a batch by **Poisson sampling** (each of
the client's ``n`` train images joins independently with probability ``q = batch_size /
n``; Opacus's ``UniformWithReplacementSampler``, ``int(1 / q)`` steps per epoch), clips each
sample's gradient to ``max_grad_norm`` (Opacus's ``GradSampleModule`` and ``DPOptimizer``)
and adds Gaussian noise of standard deviation ``noise_multiplier x max_grad_norm`` to their
sum. The accountants (RDP or PRV, Opacus's) assume exactly that: the subsampled Gaussian
mechanism with sampling rate ``q``, composed over every step the client takes in the run.

Three parts, on both sides of the client boundary:

* :func:`plan_client` (driver, before round 1): from the client's train size (its
  ``ClientInfo.num_train``), ``train.batch_size`` and the run's planned client epochs
  (``ExperimentConfig.budget()``), the sampling rate, the planned steps, ``delta`` and the
  noise multiplier (``privacy.dp.noise_multiplier``, or Opacus's ``get_noise_multiplier``
  for the target epsilon over the planned steps); a plan whose epsilon would exceed the
  target fails the run before any training.
* :class:`DPTraining` (client, in ``Client.fit``): the per-sample gradient hooks and the DP
  optimiser for one fit, from the plan's values the fit config carries
  (:func:`fit_config`), removed again after it.
* :class:`DPLedger` (driver, after every round): each client's accountant history of
  ``(noise_multiplier, sample_rate, steps)``, from the ``dp_steps`` the client reports; its
  spent epsilon goes into the history, and a client over its target stops the run. The
  ledger holds nothing the run history does not: on resume it is rebuilt from it.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

EPSILON_TOLERANCE = 0.01
"""Slack, in epsilon, of the target checks (Opacus's own binary-search tolerance)."""

FIT_KEYS = ("dp_noise_multiplier", "dp_sample_rate", "dp_max_grad_norm")
"""The fit-config keys that turn DP-SGD on in ``Client.fit`` (all three, or none)."""


def epsilon_of(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               accountant: str) -> float:
    """Epsilon at ``delta`` of ``steps`` DP-SGD steps at ``noise_multiplier`` and
    ``sample_rate``, by Opacus's accountant ``accountant`` (``rdp`` or ``prv``)."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def epsilon_of_history(history: Iterable[tuple[float, float, int]], delta: float,
                       accountant: str) -> float:
    """Epsilon at ``delta`` of an Opacus accountant history (``(noise_multiplier,
    sample_rate, steps)`` entries, composed); 0 when no step was taken.

    ``rdp`` is Opacus's ``RDPAccountant.get_epsilon`` computed the same way (its default
    orders, each entry's RDP curve times its steps, summed, then
    ``get_privacy_spent``), with the one-step curve of each ``(noise_multiplier,
    sample_rate)`` cached: composing a run's rounds then costs no new series. ``prv`` asks
    Opacus's ``PRVAccountant``.
    """
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not entries:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(np.asarray(_rdp_per_step(s, q)) * n for s, q, n in entries)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    return _accountant_epsilon(entries, float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus's RDP curve of one subsampled-Gaussian step, at its default orders."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                        steps=1, orders=RDPAccountant.DEFAULT_ALPHAS),
                            dtype=float).tolist())


@functools.lru_cache(maxsize=1024)
def _accountant_epsilon(entries: tuple[tuple[float, float, int], ...], delta: float,
                        accountant: str) -> float:
    """Opacus's accountant ``accountant`` on history ``entries`` (cached)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(entries)
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class DPPlan:
    """One client's DP-SGD plan for a whole run.

    Attributes
    ----------
    num_train
        The client's train images (``n``).
    sample_rate
        Poisson sampling rate ``q = min(1, batch_size / n)``.
    steps_per_epoch
        ``int(1 / q)`` (Opacus's convention: an epoch is ``1 / q`` expected batches).
    planned_steps
        ``planned_epochs x steps_per_epoch``: every step the client takes in the run.
    noise_multiplier, max_grad_norm
        Noise standard deviation over the clipping norm, and the clipping norm.
    target_epsilon, delta
        The client's budget.
    planned_epsilon
        The accountant's epsilon after ``planned_steps``.
    accountant
        ``rdp`` or ``prv``.
    """

    num_train: int
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    delta: float
    planned_epsilon: float
    accountant: str


@functools.lru_cache(maxsize=256)
def plan_client(dp: Any, num_train: int, batch_size: int, planned_epochs: int) -> DPPlan:
    """The DP-SGD plan of a client with ``num_train`` train images (cached: clients of one
    size share one noise calibration).

    Parameters
    ----------
    dp
        The ``privacy.dp`` settings (:class:`engine.config.schema.DPConfig`).
    num_train
        The client's train images.
    batch_size
        The expected batch size (``train.batch_size``).
    planned_epochs
        The epochs the client trains over the whole run.

    Raises
    ------
    ValueError
        For an empty client, or when the planned steps would spend more than the target
        (a given ``noise_multiplier`` too small, or a target no noise reaches).
    """
    from opacus.accountants.utils import get_noise_multiplier

    if num_train < 1:
        raise ValueError("privacy.dp: a client without train images cannot train under DP")
    q = min(1.0, batch_size / num_train)
    steps_per_epoch = int(1 / q)
    steps = planned_epochs * steps_per_epoch
    delta = dp.delta if dp.delta is not None else 1.0 / (10 * num_train)
    sigma = dp.noise_multiplier
    if sigma is None:
        try:
            with warnings.catch_warnings():  # the search's trial noises hit the last order
                warnings.filterwarnings("ignore", message="Optimal order is the largest")
                sigma = get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=delta,
                                             sample_rate=q, steps=steps,
                                             accountant=dp.accountant,
                                             epsilon_tolerance=EPSILON_TOLERANCE)
        except ValueError as err:
            raise ValueError(f"privacy.dp: no noise multiplier reaches epsilon={dp.epsilon} "
                             f"at delta={delta:.3g} over {steps} steps ({err})") from err
    eps = epsilon_of(sigma, q, steps, delta, dp.accountant)
    if eps > dp.epsilon + EPSILON_TOLERANCE:
        raise ValueError(f"privacy.dp: the run's {steps} planned DP steps "
                         f"({planned_epochs} epochs x {steps_per_epoch}, q={q:.4g}) at "
                         f"noise_multiplier={sigma:.4g} spend epsilon={eps:.3f} > target "
                         f"{dp.epsilon} (delta={delta:.3g}); raise the noise multiplier, the "
                         f"target or cut the epochs")
    return DPPlan(num_train=num_train, sample_rate=q, steps_per_epoch=steps_per_epoch,
                  planned_steps=steps, noise_multiplier=float(sigma),
                  max_grad_norm=dp.max_grad_norm, target_epsilon=dp.epsilon, delta=delta,
                  planned_epsilon=eps, accountant=dp.accountant)


def fit_config(plan: DPPlan) -> dict[str, float]:
    """The fit-config keys (:data:`FIT_KEYS`) that make ``Client.fit`` train under
    ``plan``: scalars, so any transport carries them."""
    return {"dp_noise_multiplier": plan.noise_multiplier,
            "dp_sample_rate": plan.sample_rate, "dp_max_grad_norm": plan.max_grad_norm}


class DPTraining:
    """One fit's DP-SGD on a client: Poisson batches, per-sample clipping, Gaussian noise.

    Built from the fit config (:meth:`from_config`); :meth:`attach` wraps the client's
    network in Opacus's ``GradSampleModule`` hooks (parameter names and the network object
    unchanged) and its optimiser in a ``DPOptimizer`` (noise from the global torch
    generator, which ``Client.fit`` seeds; Opacus's ``secure_mode`` is off: this is a
    simulation, not hardened against floating-point attacks); :meth:`detach` removes the
    hooks. :meth:`batches` draws one epoch's batches of one domain's train split.

    Parameters
    ----------
    noise_multiplier, sample_rate, max_grad_norm
        The plan's values.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float,
                 max_grad_norm: float) -> None:
        if not noise_multiplier >= 0 or not 0 < sample_rate <= 1 or not max_grad_norm > 0:
            raise ValueError(f"DP-SGD needs noise_multiplier >= 0, sample_rate in (0, 1] and "
                             f"max_grad_norm > 0; got {noise_multiplier}, {sample_rate}, "
                             f"{max_grad_norm}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.max_grad_norm = float(max_grad_norm)
        self.steps = 0
        self._module: Any = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DPTraining | None:
        """The DP-SGD of a fit config, or ``None`` when it asks for none.

        Raises
        ------
        ValueError
            When only some of :data:`FIT_KEYS` are given.
        """
        given = [k for k in FIT_KEYS if config.get(k) is not None]
        if not given:
            return None
        if len(given) != len(FIT_KEYS):
            raise ValueError(f"DP-SGD fit config needs all of {list(FIT_KEYS)}, got {given}")
        return cls(float(config["dp_noise_multiplier"]), float(config["dp_sample_rate"]),
                   float(config["dp_max_grad_norm"]))

    def steps_per_epoch(self) -> int:
        """``int(1 / sample_rate)``, as the plan counts them."""
        return int(1 / self.sample_rate)

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               num_train: int) -> torch.optim.Optimizer:
        """Hook ``model`` for per-sample gradients and wrap ``optimizer`` (whose parameters
        must all be reached by the forward pass) in a ``DPOptimizer``; returns it. The mean
        loss of a batch is averaged over the *expected* batch size ``q x n``, as Opacus
        does under Poisson sampling."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from engine.nn.privacy import BACKWARD_HOOK_WARNING

        # torch warns on every first backward through the hooks that the images need no
        # gradient; that is expected here
        warnings.filterwarnings("ignore", message=BACKWARD_HOOK_WARNING, category=UserWarning)
        self._module = GradSampleModule(model, loss_reduction="mean")
        return DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                           max_grad_norm=self.max_grad_norm,
                           expected_batch_size=max(1, round(self.sample_rate * num_train)),
                           loss_reduction="mean")

    def detach(self) -> None:
        """Remove the hooks and Opacus's per-parameter attributes."""
        if self._module is not None:
            self._module.cleanup()
            self._module = None

    def batches(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch of Poisson-sampled index batches over ``n`` samples (each sample in
        each batch independently with probability ``sample_rate``; a batch may be empty)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=self.sample_rate,
                                                generator=generator)
        for idx in sampler:
            yield torch.as_tensor(idx, dtype=torch.long)

    def step(self, optimizer: torch.optim.Optimizer,
             extra_grad: Callable[[], None] | None = None) -> None:
        """One DP step (the loss is backpropagated): clip, noise and average the per-sample
        gradients, then ``extra_grad`` (a data-independent term added to ``p.grad``, e.g.
        FedProx's proximal pull; post-processing, no privacy cost) and the update. Counted
        in :attr:`steps`."""
        if optimizer.pre_step():  # type: ignore[attr-defined]
            if extra_grad is not None:
                extra_grad()
            optimizer.original_optimizer.step()  # type: ignore[attr-defined]
        self.steps += 1

    def skip_empty(self, optimizer: torch.optim.Optimizer) -> None:
        """An empty Poisson batch: no update is made, the step still counts (the accountant
        over-counts, which only overstates the spent epsilon)."""
        optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        """What the fit reports for the driver's ledger: ``dp_steps`` (taken in this fit),
        ``dp_noise_multiplier``, ``dp_sample_rate`` and ``dp_max_grad_norm``."""
        return {"dp_steps": float(self.steps), "dp_noise_multiplier": self.noise_multiplier,
                "dp_sample_rate": self.sample_rate, "dp_max_grad_norm": self.max_grad_norm}


@dataclass
class DPLedger:
    """Every client's accountant over the run, kept by the driver.

    Parameters
    ----------
    plans
        Client id -> :class:`DPPlan`.
    history
        Client id -> Opacus accountant history ``[(noise_multiplier, sample_rate, steps)]``.
    """

    plans: dict[str, DPPlan]
    history: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)

    def record(self, cid: str, metrics: Mapping[str, float]) -> float:
        """Add one fit's DP steps (its ``dp_*`` metrics) to client ``cid``; returns the
        client's spent epsilon over the run so far.

        Raises
        ------
        ValueError
            When the fit reports no DP steps (it did not train under DP).
        """
        if "dp_steps" not in metrics:
            raise ValueError(f"client {cid}: its fit reports no dp_steps; it did not train "
                             f"under DP-SGD")
        self.history.setdefault(cid, []).append(
            (float(metrics["dp_noise_multiplier"]), float(metrics["dp_sample_rate"]),
             int(metrics["dp_steps"])))
        return self.epsilon(cid)

    def epsilon(self, cid: str) -> float:
        """Client ``cid``'s spent epsilon at its plan's delta."""
        plan = self.plans[cid]
        return epsilon_of_history(self.history.get(cid, []), plan.delta, plan.accountant)

    def steps(self, cid: str) -> int:
        """Client ``cid``'s DP steps so far."""
        return sum(n for _, _, n in self.history.get(cid, []))

    def projected(self, cid: str, steps: int) -> float:
        """Client ``cid``'s epsilon if it now took ``steps`` more steps of its plan."""
        plan = self.plans[cid]
        history = [*self.history.get(cid, []),
                   (plan.noise_multiplier, plan.sample_rate, int(steps))]
        return epsilon_of_history(history, plan.delta, plan.accountant)

    def over_target(self) -> dict[str, float]:
        """Clients whose spent epsilon exceeds their target: client id -> spent epsilon."""
        out = {}
        for cid, plan in self.plans.items():
            eps = self.epsilon(cid)
            if eps > plan.target_epsilon + EPSILON_TOLERANCE:
                out[cid] = eps
        return out

    def rebuild(self, records: Iterable[Any]) -> None:
        """Refill the histories from a run history's ``fit`` records (on resume): every
        (round, client) with ``dp_steps``, in round order."""
        fits: dict[tuple[int, str], dict[str, float]] = {}
        for r in records:
            if r.phase == "fit" and r.metric.startswith("dp_"):
                fits.setdefault((r.round, r.client), {})[r.metric] = r.value
        self.history = {}
        for (_, cid), metrics in sorted(fits.items()):
            if cid in self.plans and "dp_steps" in metrics and not math.isnan(
                    metrics["dp_steps"]):
                self.history.setdefault(cid, []).append(
                    (metrics["dp_noise_multiplier"], metrics["dp_sample_rate"],
                     int(metrics["dp_steps"])))


def plan_ledger(dp: Any, num_train: Mapping[str, int], batch_size: int,
                planned_epochs: int) -> DPLedger:
    """A fresh :class:`DPLedger` with every client's :func:`plan_client` (``num_train``:
    client id -> train images).

    Raises
    ------
    ValueError
        Naming the first client whose plan fails.
    """
    plans = {}
    for cid, n in num_train.items():
        try:
            plans[cid] = plan_client(dp, n, batch_size, planned_epochs)
        except ValueError as err:
            raise ValueError(f"client {cid} ({n} train images): {err}") from err
    return DPLedger(plans)
