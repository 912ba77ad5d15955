"""Inside a trial: the Tune function trainable and the callbacks that report to Tune.

Every round reports the objective (:data:`~engine.tune.names.METRIC`, defined in
:mod:`engine.tune.objective`) after its federated validation, with the round as
:data:`~engine.tune.names.VALIDATED_ROUND`; every distillation is a Ray Train
``TorchTrainer`` whose reports reach Tune through ``TuneReportCallback``, so ASHA sees
intermediate results. Ray is imported inside the functions: Tune pickles
:func:`run_trial` by reference, so this module must import cleanly in the trial's worker
process.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from engine.config import to_dict
from engine.config.plugins import Plugins, install
from engine.tune.names import CHANCE_AUC, METRIC, TIME_ATTR, VALIDATED_ROUND
from engine.tune.objective import objective
from engine.tune.schema import trial_config


def _round_reporter() -> Any:
    """A simulation callback that reports the objective to Tune after every round.

    Returns
    -------
    RoundReporter
        An ``engine.fl.simulation.Callback``; ``last`` is the objective so far (chance
        level before the first validation, see :mod:`engine.tune.objective`) and ``round``
        the last round it saw.
    """
    from ray import tune

    from engine.fl.simulation import Callback, Simulation

    class RoundReporter(Callback):
        """Reports the objective to Tune after every round's federated validation."""

        def __init__(self) -> None:
            self.last = CHANCE_AUC
            self.round = 0

        def on_round_end(self, sim: Simulation, server_round: int) -> None:
            per_domain = sim.val_auc(server_round)
            if per_domain:  # a round without validation keeps the objective so far
                self.last = objective(per_domain, sim.cfg.data.domains)
            self.round = server_round
            tune.report({METRIC: self.last, TIME_ATTR: float(server_round),
                         "rounds_done": server_round,
                         VALIDATED_ROUND: server_round if per_domain else 0,
                         **{f"val_auc/{d}": v for d, v in per_domain.items()}})

    return RoundReporter()


def _distill_callbacks(reporter: Any) -> Callable[[Any], list[Any]]:
    """The Train callbacks of each distillation, given the trial's round reporter.

    Parameters
    ----------
    reporter
        The :func:`_round_reporter` of the trial (read for the objective so far).

    Returns
    -------
    callable
        Distillation request -> ``[DistillReportCallback]``.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class DistillReportCallback(TuneReportCallback):
        """``TuneReportCallback`` that adds the objective so far and the trial's progress
        (rounds done plus the distillation's fraction) to each Train report."""

        def __init__(self, objective: float, server_round: int, steps: int) -> None:
            super().__init__()
            self.extra = {"objective": objective, "round": server_round, "steps": steps}

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                         checkpoint: Any) -> None:
            first = dict(metrics[0])
            extra = self.extra
            first.update({METRIC: extra["objective"], "rounds_done": extra["round"] - 1,
                          VALIDATED_ROUND: 0,
                          # below the round's own milestone, which its validation reaches
                          TIME_ATTR: extra["round"] - 1
                          + first.get("step", 0) / (extra["steps"] + 1)})
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    def make(request: Any) -> list[Any]:
        return [DistillReportCallback(reporter.last, request.server_round or reporter.round + 1,
                                      request.settings.steps)]

    return make


def run_trial(config: dict[str, Any], plugins: Plugins | None = None) -> None:
    """The Tune function trainable: one experiment with the sampled values.

    Parameters
    ----------
    config
        The sampled values (dotted experiment keys) plus ``__sweep``: the trial base config
        (``base``) and the sweep directory (``dir``), where the trial leaves a marker under
        ``invocations/`` when it starts and another (``.done``) when it finishes.
    plugins
        The driver's registrations, installed before the trial's config is read.
    """
    install(plugins)
    from ray import tune

    from engine.records.storage import Storage
    from engine.run.build import build_simulation
    from engine.run.session import Session, resolve_paths

    meta = config["__sweep"]
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    trial_id = tune.get_context().get_trial_id()
    marker = Path(meta["dir"], "invocations", f"{trial_id}.{uuid.uuid4().hex[:8]}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"params": params, "time": time.time()}, default=str))
    saved = trial_config(meta["base"], params)
    cfg = resolve_paths(saved, **meta.get("paths", {}))  # this machine's data and cache
    storage = Storage(Path(tune.get_context().get_trial_dir()) / "run")
    storage.write_text("config.yaml", yaml.safe_dump(to_dict(saved), sort_keys=False))
    session = Session(cfg).start()
    try:
        reporter = _round_reporter()
        sim = build_simulation(cfg, storage, session, callbacks=[reporter],
                               train_callbacks=_distill_callbacks(reporter))
        sim.run()
    finally:
        session.shutdown()
    marker.with_suffix(marker.suffix + ".done").write_text(str(time.time()))
