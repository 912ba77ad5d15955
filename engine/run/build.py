"""One way to build the round loop of a run, used by runs, sweeps and benchmarks alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from engine.config import ExperimentConfig
from engine.fl.simulation import Callback, Simulation
from engine.records.storage import Storage
from engine.run.session import Session
from strategies.distill import DistillRequest


def build_simulation(cfg: ExperimentConfig, storage: Storage, session: Session, *,
                     quiet: bool = True, callbacks: Sequence[Callback] = (),
                     train_callbacks: Callable[[DistillRequest], list[Any]] | None = None,
                     encoder: dict[str, Any] | None = None) -> Simulation:
    """The :class:`~engine.fl.simulation.Simulation` of ``cfg`` on a started ``session``.

    Parameters
    ----------
    cfg
        The run's experiment (a study's baselines pass their own).
    storage
        The run directory.
    session
        Ray, the base encoder and the client actors.
    quiet, callbacks
        Progress display and round-loop hooks.
    train_callbacks
        Request -> Ray Train callbacks of each distillation (e.g. Tune's reporting).
    encoder
        The initial global encoder (default: the session's base).

    A strategy that declares ``distils`` gets a Ray Train distiller writing under
    ``<run dir>/train``; others get none.
    """
    distiller = (session.distiller(storage, train_callbacks, seed=cfg.seed)
                 if cfg.strategy.strategy_class.distils else None)
    start = session.base if encoder is None else encoder
    return Simulation(cfg, storage, session.actors, start, distiller=distiller,
                      quiet=quiet, callbacks=callbacks)
