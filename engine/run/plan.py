"""What a run of an experiment will place and do, worked out from its config alone.

:func:`placement_plan` is a pure function of an :class:`~engine.config.ExperimentConfig`: it
starts nothing, reads no data and imports no Ray. ``umim run CONFIG --dry-run`` and
``umim config show CONFIG`` print it with :func:`format_plan`. The numbers follow the
engine's own rules: client ids as :func:`engine.run.session.client_specs` names them,
client ``i`` on actor ``i % K`` as :class:`engine.cluster.pool.ActorPool` places them, the
steps of :class:`engine.run.study.Study` (named as their ``progress/<step>.done`` markers)
and the peak of :func:`engine.cluster.resources.trial_resources`.
"""

from __future__ import annotations

import json
from typing import Any

from engine.cluster.resources import trial_phases, trial_resources
from engine.config import ExperimentConfig, TrainScaling, to_dict
from engine.run.names import (
    base_label,
    encoder_label,
    lodo_label,
    method_name,
    replicate_step,
    step_name,
)
from strategies.factory import resolve_strategy
from strategies.types import POOLED_CID

__all__ = ["client_ids", "format_plan", "placement_plan"]


def client_ids(cfg: ExperimentConfig) -> list[str]:
    """The ids of every client the session starts, in the engine's order.

    Parameters
    ----------
    cfg
        The experiment.

    Returns
    -------
    list of str
        One id per client: the domain, or ``<domain>#<i>`` when
        ``data.clients_per_domain > 1``; then ``pooled`` when a strategy of the experiment
        declares ``pooled``.
    """
    n = cfg.data.clients_per_domain
    ids = [domain if n == 1 else f"{domain}#{i}" for domain in cfg.data.domains
           for i in range(n)]
    if cfg.needs_pooled_client:
        ids.append(POOLED_CID)
    return ids


def _job(scaling: TrainScaling, purpose: list[str], **extra: Any) -> dict[str, Any]:
    gpus = scaling.gpus_per_worker if scaling.use_gpu else 0.0
    return {"workers": scaling.num_workers, "cpus_per_worker": scaling.cpus_per_worker,
            "gpus_per_worker": gpus, "cpus": scaling.num_workers * scaling.cpus_per_worker,
            "gpus": scaling.num_workers * gpus, "for": purpose, **extra}


def _steps(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """The steps of the study, in the order it runs them (replicate after replicate)."""
    ev = cfg.evaluation
    strategy = cfg.strategy.name
    steps: list[dict[str, Any]] = []
    for r in range(ev.replicates):
        seed = cfg.seed + r

        def step(name: str, r: int = r) -> str:
            return replicate_step(name, r, ev.replicates)

        steps.append({"step": step("main"), "strategy": strategy,
                      "rounds": cfg.planned_rounds(), "seed": seed,
                      "client_epochs": cfg.budget()})
        for name in ev.baselines:
            rounds = cfg.baseline_rounds(name)
            section = ev.baseline_strategy(name, rounds)
            planned = section.strategy_class.planned_rounds(section.options, cfg.data.domains,
                                                            rounds)
            for bseed in ev.baseline_seeds or (seed,):
                steps.append({"step": step(f"baseline-{name}-seed{bseed}"), "strategy": name,
                              "rounds": planned, "seed": bseed,
                              "client_epochs": cfg.budgets()[name],
                              "options": to_dict(section.options)})
        arms = [encoder_label(cfg, arm) for arm in ev.encoders]
        if ev.finetune_epochs > 0:
            for mode in ev.modes:
                for fraction in ev.label_fractions:
                    steps.append({"step": step(step_name(mode, fraction)), "mode": mode,
                                  "label_fraction": fraction,
                                  "arms": [method_name(a, mode, fraction) for a in arms],
                                  "epochs": (ev.probe_epochs if mode == "linear_probe"
                                             else ev.finetune_epochs),
                                  "seeds": list(ev.seeds)})
        for domain in ev.lodo_domains:
            steps.append({"step": step(f"lodo-{domain}"), "held_out": domain,
                          "arms": [f"lodo:{method_name(a, m, f)}"
                                   for m in ev.modes for f in ev.label_fractions
                                   for a in (lodo_label(cfg), base_label(cfg))],
                          "epochs": ev.finetune_epochs, "seeds": list(ev.seeds)})
        if ev.privacy_audit:
            steps.append({"step": step("audit"),
                          "artefacts": ["teacher", strategy, *ev.baselines],
                          "attack": "loss threshold", "nonmembers": ev.split})
    return steps


def placement_plan(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a run of ``cfg`` places on the cluster and which steps it runs.

    Parameters
    ----------
    cfg
        The experiment (as :func:`engine.config.load_config` returns it).

    Returns
    -------
    dict
        Plain data (JSON-ready):

        * ``name``, ``seed``;
        * ``clients``: ``count``, ``ids`` (see :func:`client_ids`), ``per_domain``,
          ``pooled`` (whether the pooled oracle client is started);
        * ``actors``: ``count`` (``min(clients.num_actors or clients, clients)``),
          ``num_cpus`` / ``num_gpus`` of each, and ``clients``: the ids on each actor
          (client ``i`` lives on actor ``i % count``);
        * ``strategy``: ``name``, ``rounds`` (as the strategy plans them),
          ``configured_rounds`` (``strategy.rounds``), ``options``, ``pooled``, ``distils``;
        * ``base``: ``mim`` (MIM pretraining) or ``random-init``;
        * ``train_jobs``: ``runs`` (whether Ray Train jobs run), ``pretrain`` and
          ``distill`` (``None``, or ``workers``, ``cpus_per_worker``, ``gpus_per_worker``,
          totals ``cpus`` / ``gpus`` and ``for``: the steps that run the job);
        * ``steps``: the study's steps in order (``main``, ``finetune``, ``lodo-<domain>``,
          ``baseline-<name>-seed<k>``, ``audit``), each with what it runs;
        * ``phases``: what is held at once, phase by phase (``pretrain`` before the actors
          start, then ``rounds``: actors plus distillation workers), with totals;
        * ``peak``: ``cpus`` / ``gpus`` at the largest phase (what one run needs).
    """
    ids = client_ids(cfg)
    k = min(cfg.clients.num_actors or len(ids), len(ids))
    main_cls = cfg.strategy.strategy_class
    steps = _steps(cfg)

    pretrain = None
    if cfg.pretrain.method == "mim":
        pretrain = _job(cfg.pretrain, ["base"], epochs=cfg.pretrain.epochs, cached=True)
    distill_for = [s["step"] for s in steps if "held_out" in s
                   or ("strategy" in s and resolve_strategy(s["strategy"]).distils)]
    distill = (_job(cfg.distill, distill_for, steps=cfg.distill.steps)
               if distill_for else None)

    phases = trial_phases(cfg)
    names = ["pretrain", "rounds"] if cfg.pretrain.method == "mim" else ["rounds"]
    cpus, gpus = trial_resources(cfg)
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "clients": {"count": len(ids), "ids": ids, "per_domain": cfg.data.clients_per_domain,
                    # the strategies whose ``pooled`` declaration starts the oracle client
                    "pooled_for": [cls.name for cls in cfg.strategy_classes() if cls.pooled]},
        "actors": {"count": k, "num_cpus": cfg.clients.num_cpus,
                   "num_gpus": cfg.clients.num_gpus,
                   "clients": [ids[a::k] for a in range(k)]},
        "strategy": {"name": cfg.strategy.name, "rounds": cfg.planned_rounds(),
                     "configured_rounds": cfg.strategy.rounds,
                     "options": to_dict(cfg.strategy.options),
                     "pooled": bool(main_cls.pooled), "distils": bool(main_cls.distils)},
        "base": base_label(cfg),
        "train_jobs": {"runs": cfg.runs_train_jobs, "pretrain": pretrain, "distill": distill},
        "steps": steps,
        "phases": [{"phase": name,
                    "groups": [{"count": n, "num_cpus": c, "num_gpus": g} for n, c, g in groups],
                    "cpus": sum(n * c for n, c, _ in groups),
                    "gpus": sum(n * g for n, _, g in groups)}
                   for name, groups in zip(names, phases, strict=True)],
        "peak": {"cpus": cpus, "gpus": gpus},
    }


# -- text -----------------------------------------------------------------------------------
def _names(items: list[str], limit: int = 12) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... (+{len(items) - limit} more)"


def _options(options: Any) -> str:
    if not options:
        return "none"
    return ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in options.items())


def _size(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU, {gpus:g} GPU"


def _describe_job(job: dict[str, Any] | None) -> str:
    if job is None:
        return "no"
    each = _size(job["cpus_per_worker"], job["gpus_per_worker"])
    return (f"{job['workers']} worker(s) x ({each}) = {_size(job['cpus'], job['gpus'])}; "
            f"for {', '.join(job['for'])}")


def _describe_step(step: dict[str, Any]) -> str:
    name = step["step"]
    if "strategy" in step:
        return (f"{name}: {step['strategy']}, {step['rounds']} round(s), seed {step['seed']}, "
                f"{step['client_epochs']} client epoch(s)")
    if "mode" in step:
        return (f"{name}: {', '.join(step['arms'])}; {step['epochs']} epoch(s), "
                f"seeds {step['seeds']}")
    if "artefacts" in step:
        return (f"{name}: {step['attack']} membership inference on "
                f"{', '.join(step['artefacts'])} (members: train, non-members: "
                f"{step['nonmembers']})")
    return (f"{name}: distil without {step['held_out']}, then {' vs '.join(step['arms'])} "
            f"on it, {step['epochs']} epoch(s), seeds {step['seeds']}")


def format_plan(plan: dict[str, Any], max_actors: int = 16) -> str:
    """The plan of :func:`placement_plan` as text, one fact per line.

    Parameters
    ----------
    plan
        What :func:`placement_plan` returned.
    max_actors
        List the clients of at most this many actors (then a count of the rest).

    Returns
    -------
    str
        Lines without a trailing newline.
    """
    clients, actors, strategy = plan["clients"], plan["actors"], plan["strategy"]
    jobs = plan["train_jobs"]
    k = actors["count"]
    lines = [f"placement plan of {plan['name']!r} (seed {plan['seed']})",
             f"  clients      {clients['count']}: {_names(clients['ids'])}"
             + (f" (pooled: the oracle client holding every domain, for "
                f"{', '.join(clients['pooled_for'])})" if clients["pooled_for"] else ""),
             f"  actors       {k} x ({_size(actors['num_cpus'], actors['num_gpus'])}); "
             f"client i on actor i % {k}"]
    for a, ids in enumerate(actors["clients"][:max_actors]):
        lines.append(f"    actor {a:<6} {len(ids)} client(s): {_names(ids, 8)}")
    if k > max_actors:
        lines.append(f"    ... {k - max_actors} more actor(s)")
    flags = [f for f in ("pooled", "distils") if strategy[f]]
    rounds = f"{strategy['rounds']} round(s)"
    if strategy["rounds"] != strategy["configured_rounds"]:
        rounds += f" as it plans them (strategy.rounds={strategy['configured_rounds']})"
    lines += [f"  strategy     {strategy['name']}, {rounds}"
              + (f"; {', '.join(flags)}" if flags else ""),
              f"    options    {_options(strategy['options'])}",
              f"  base         {plan['base']}",
              f"  Ray Train    {'yes' if jobs['runs'] else 'no'}",
              f"    pretrain   {_describe_job(jobs['pretrain'])}"
              + ("; reused from the cache when it was trained before"
                 if jobs["pretrain"] else ""),
              f"    distill    {_describe_job(jobs['distill'])}",
              "  steps"]
    lines += [f"    {i}. {_describe_step(step)}" for i, step in enumerate(plan["steps"], 1)]
    lines.append("  phases")
    for phase in plan["phases"]:
        groups = " + ".join(f"{g['count']} x ({_size(g['num_cpus'], g['num_gpus'])})"
                            for g in phase["groups"])
        lines.append(f"    {phase['phase']:<10} {groups} = {_size(phase['cpus'], phase['gpus'])}")
    lines.append(f"  peak         {_size(plan['peak']['cpus'], plan['peak']['gpus'])}")
    return "\n".join(lines)
