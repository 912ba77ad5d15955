"""The names and the chance level that a sweep's trials report to Tune.

Kept in one light module so the trial (:mod:`engine.tune.trial`), the driver
(:mod:`engine.tune.driver`) and the outputs (:mod:`engine.tune.outputs`) agree on them.
"""

from __future__ import annotations

METRIC = "val_auc"
"""The objective: the mean over domains of the global model's federated validation AUC."""

TIME_ATTR = "progress"
"""ASHA's time attribute: rounds done, plus the running distillation's fraction."""

CHANCE_AUC = 0.5
"""The objective reported before a trial has a global model to score: chance level."""
