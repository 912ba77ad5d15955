"""The sweep's objective, defined once so every report of every trial means the same thing.

The objective after a round is the mean, over **all** the experiment's domains, of the
global model's federated validation AUC, where a domain the global model cannot score yet
(the universal strategy's later stages have not joined, or its clients' validation failed)
counts at chance level (:data:`~engine.tune.names.CHANCE_AUC`).

Why not the mean over the domains scored so far: after round 1 of a two-stage universal
run only the stage-1 domains have a head, so that mean averages four domains while a
finished trial averages eight: an ASHA-stopped trial's value and a finished trial's value
would be numbers about different things, and TPE would be fitted on both. Why not a fixed
subset that every round scores (the stage-1 domains): the final objective would then ignore
the later domains, the very ones the universal model has to integrate. Counting a missing
domain at chance keeps the finished trial's value what it always was (the mean over all
domains, as ``umim run`` reports ``mean_val_auc``), gives every rung the same scale (a
stopped trial's value is what its model was worth on the whole task when it stopped), and
leaves ASHA's decisions unchanged: at one rung every trial has scored the same domains, so
its ranking is that of the mean over them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from engine.tune.names import CHANCE_AUC


def objective(val_auc: Mapping[str, float], domains: Collection[str]) -> float:
    """The objective of one round.

    Parameters
    ----------
    val_auc
        Domain -> the global model's federated val AUC this round (scored domains only).
    domains
        The experiment's domains; a domain of ``val_auc`` outside them counts too.

    Returns
    -------
    float
        The mean over the domains, :data:`~engine.tune.names.CHANCE_AUC` for one not scored.

    Raises
    ------
    ValueError
        No domain at all.
    """
    every = sorted(set(domains) | set(val_auc))
    if not every:
        raise ValueError("the objective needs at least one domain")
    return sum(val_auc.get(d, CHANCE_AUC) for d in every) / len(every)
