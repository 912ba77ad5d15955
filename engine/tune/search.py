"""The sweep's searcher: Ray Tune's ``OptunaSearch`` with its study live in ``optuna.db``.

Three things differ from ``OptunaSearch`` as Ray 2.55 ships it:

* The study lives in an RDB storage (``sqlite:///<sweep dir>/optuna.db``) from the first
  trial, so ``optuna-dashboard sqlite:///<sweep dir>/optuna.db`` follows a running sweep;
  each Optuna trial carries its Tune trial id as the user attribute ``tune_trial_id``.
  The file appears with its schema complete (built aside, then renamed), so a reader that
  opens it early never races the driver in creating the tables.
* Optuna gets one intermediate value per validated round, at the round as the step
  (:data:`~engine.tune.names.VALIDATED_ROUND`), not one per Tune report at Tune's
  ``training_iteration`` (which counts distillation reports too); the result on which ASHA
  stops a trial, which Tune never passes to ``on_trial_result``, is reported as well.
* A trial that ends before the planned rounds without an error (ASHA stopped it) is told
  to Optuna as ``PRUNED`` (Optuna then takes its last intermediate value as its value and
  TPE ranks it among pruned trials by the round it reached), not ``COMPLETE`` with a
  partial objective; a finished trial is ``COMPLETE`` with its final objective, a failed
  one ``FAIL``.

Together with the objective of :mod:`engine.tune.objective` (the same scale at every
round), TPE is fitted on values that are comparable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from engine.tune.names import (
    METRIC,
    TRIAL_ID_ATTR,
    VALIDATED_ROUND,
    study_path,
    study_url,
)

logger = logging.getLogger(__name__)


def _create_storage_file(folder: str | Path) -> None:
    """Create ``folder/optuna.db`` with Optuna's schema, atomically, if it is not there.

    Two processes that open a new SQLite file at once both run Optuna's schema migration,
    and one fails (``UNIQUE constraint failed: alembic_version``): ``optuna-dashboard`` or
    ``optuna.load_study`` opened while the sweep starts must find either no file or a whole
    one.
    """
    from optuna.storages import RDBStorage

    path = study_path(folder)
    if path.exists():
        return
    staging = path.with_name(f".{path.name}.{os.getpid()}.init")
    staging.unlink(missing_ok=True)
    RDBStorage(f"sqlite:///{staging}").engine.dispose()
    os.replace(staging, path)


class LiveOptunaSearch(OptunaSearch):
    """``OptunaSearch`` on a persistent study, with per-round values and pruned trials.

    Parameters
    ----------
    folder
        The sweep directory; the study goes to ``folder/optuna.db``.
    study_name
        The study's name (the sweep's).
    rounds
        The planned rounds of a trial: a trial that ends before them without an error was
        stopped by the scheduler.
    seed
        Seed of the TPE sampler.
    points_to_evaluate
        Configurations to run first (enqueued in the study).
    """

    def __init__(self, folder: str | Path, *, study_name: str, rounds: int, seed: int,
                 points_to_evaluate: list[dict[str, Any]] | None = None) -> None:
        from optuna.storages import RDBStorage

        _create_storage_file(folder)
        self._rounds = int(rounds)
        self._reported: dict[str, set[int]] = {}
        super().__init__(metric=METRIC, mode="max", seed=seed, study_name=study_name,
                         storage=RDBStorage(study_url(folder)),
                         points_to_evaluate=points_to_evaluate)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Ask the study for a trial and tag it with the Tune trial id."""
        fresh = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if fresh and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TRIAL_ID_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Report the objective of a validated round to Optuna (other reports are skipped)."""
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        """Tell Optuna how the trial ended: ``COMPLETE``, ``PRUNED`` or ``FAIL``."""
        if (error or not result or trial_id in self._completed_trials
                or trial_id not in self._ot_trials):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        self._report(trial_id, result)  # the result ASHA stopped on never reached us
        if int(result.get("rounds_done", 0) or 0) >= self._rounds:
            super().on_trial_complete(trial_id, result=result, error=False)
            return
        from optuna.trial import TrialState

        try:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as err:  # e.g. told already by a driver killed before its checkpoint
            logger.warning("trial %s: Optuna not told it was pruned: %s", trial_id, err)
        self._completed_trials.add(trial_id)

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        """One intermediate value per validated round, once."""
        step = int(result.get(VALIDATED_ROUND, 0) or 0)
        done = self._reported.setdefault(trial_id, set())
        if step < 1 or step in done or trial_id not in self._ot_trials:
            return
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            self._ot_trials[trial_id].report(float(result[METRIC]), step)
        except UpdateFinishedTrialError as err:  # a rerun of a trial the study saw finish
            logger.warning("trial %s: round %d not reported to Optuna: %s", trial_id, step,
                           err)
        done.add(step)
