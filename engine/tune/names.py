"""The names and the chance level that a sweep's trials report to Tune, and the study's file.

Kept in one light module so the trial (:mod:`engine.tune.trial`), the searcher
(:mod:`engine.tune.search`), the driver (:mod:`engine.tune.driver`) and the outputs
(:mod:`engine.tune.outputs`) agree on them.
"""

from __future__ import annotations

from pathlib import Path

METRIC = "val_auc"
"""The objective (:func:`engine.tune.objective.objective`): the mean over all the
experiment's domains of the global model's federated validation AUC, a domain not scored
yet counting at chance, so that a value means the same at every round."""

TIME_ATTR = "progress"
"""ASHA's time attribute: rounds done, plus the running distillation's fraction."""

VALIDATED_ROUND = "validated_round"
"""The round whose federated validation a report carries; 0 for the reports in between
(distillation steps, rounds without validation). The searcher gives Optuna one
intermediate value per validated round, at that round as the step."""

CHANCE_AUC = 0.5
"""The AUC of a model that knows nothing of a domain: what the objective counts for a
domain without a score, and so the objective before a trial's first validation."""

STUDY_FILE = "optuna.db"
"""The Optuna study's SQLite file in the sweep directory, written from the first trial."""

TRIAL_ID_ATTR = "tune_trial_id"
"""The user attribute of an Optuna trial that holds its Tune trial id."""


def study_path(folder: str | Path) -> Path:
    """The absolute path of a sweep's Optuna study file, ``<sweep dir>/optuna.db``."""
    return Path(folder).resolve() / STUDY_FILE


def study_url(folder: str | Path) -> str:
    """The SQLAlchemy URL of a sweep's Optuna study (what ``optuna-dashboard`` takes).

    Parameters
    ----------
    folder
        The sweep directory.

    Returns
    -------
    str
        ``sqlite:///<absolute sweep dir>/optuna.db``.
    """
    return f"sqlite:///{study_path(folder)}"
