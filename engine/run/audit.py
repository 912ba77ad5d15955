"""The study's privacy audit (``evaluation.privacy_audit``): every client attacks, on its
own data, each model that left it or that the server released, and returns the attack's
scalars only (:mod:`engine.fl.audit`).

The artefacts of one replicate:

* ``teacher``: per client, the last model it returned in the main run (in the universal
  strategy, its fine-tuned model of the last round of its stage). The driver keeps a copy
  of each as it arrives (:class:`TeacherCapture`, under ``audit/teachers/``) so the audit
  can hand it back to its client. Under ``privacy.transfer: predictions`` no weights leave
  a client: the main run's fits ask it to keep its teacher at home (``keep_teacher``), and
  the audit asks it to attack that one (``kept_teacher``), reported as having stayed home
  (a reference: what the teacher would leak had it left). A client whose actor restarted
  since has lost it: that call fails and is recorded;
* the main run's global model (the method name of the main strategy, e.g. ``universal``):
  the reported round's model (``evaluation.select_round``), as each client scores it;
* every baseline's global model (``fedavg``, ...), likewise.

Rows go into ``results.parquet`` as method ``audit:<artefact>`` with the metrics of
:data:`engine.fl.audit.METRICS`; :func:`privacy_summary` is the summary's ``privacy``
section the report's privacy table is made from.
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from engine.config import ExperimentConfig, to_dict
from engine.fl.audit import ATTACK, LOW_FPR, MAX_AUDIT_SAMPLES, METRICS
from engine.fl.simulation import RunError
from engine.records.checkpoint import latest_checkpoint
from engine.records.results import Results
from engine.records.storage import Storage
from engine.run.build import build_simulation
from strategies.types import POOLED_CID, FitIns, FitRes, State

if TYPE_CHECKING:
    from engine.run.session import Session
    from engine.run.study import Replicate

logger = logging.getLogger(__name__)

TEACHERS = "audit/teachers"
"""Folder of a replicate's run directory holding each client's last returned model."""
TEACHER = "teacher"
"""The artefact name of the clients' own returned models."""
PREFIX = "audit:"
"""The method prefix of the audit's result rows."""


def _tensor_bytes(state: State) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


class TeacherCapture:
    """An observer of client messages that keeps, per client, the last model it returned
    while :meth:`start`-ed (the main run): what left the client, written to
    ``<run dir>/audit/teachers/<cid>.pt`` as it arrives (so a resumed run still has the
    teachers of the rounds before its checkpoint). A result without weights (the
    ``predictions`` transfer) is not kept: there is nothing the server holds."""

    def __init__(self) -> None:
        self.storage: Storage | None = None

    def start(self, storage: Storage) -> None:
        """Keep the models returned from now on under ``storage``."""
        self.storage = storage

    def stop(self) -> None:
        """Stop keeping models."""
        self.storage = None

    def __call__(self, cid: str, method: str, message: Any) -> None:
        if (self.storage is None or method != "fit" or not isinstance(message, FitRes)
                or not message.state or cid == POOLED_CID):
            return
        self.storage.write_bytes(f"{TEACHERS}/{cid}.pt", _tensor_bytes(message.state))


def teacher_states(storage: Storage) -> dict[str, State]:
    """Client id -> its kept teacher (:class:`TeacherCapture`) in a replicate's folder."""
    return {name.removesuffix(".pt"): torch.load(
                io.BytesIO(storage.read_bytes(f"{TEACHERS}/{name}")), weights_only=True)
            for name in sorted(storage.listdir(TEACHERS)) if name.endswith(".pt")}


def reported_states(cfg: ExperimentConfig, storage: Storage, session: Session, base: State
                    ) -> dict[str, State]:
    """Client id -> the model a finished run's clients score (its newest checkpoint, at the
    round ``evaluation.select_round`` reports), as the strategy hands it to each client.

    Raises
    ------
    RunError
        When the run has no checkpoint.
    """
    checkpoint = latest_checkpoint(storage)
    if checkpoint is None:
        raise RunError(f"{storage.uri} has no checkpoint to audit")
    sim = build_simulation(cfg, storage, session, quiet=True, encoder=base)
    sim.restore(checkpoint)
    sim.select()
    instructions = sim.strategy.configure_evaluate(sim.rounds, sim.eval_cids, "test")
    return {cid: ins.state for cid, ins in instructions.items()}


def artefacts(cfg: ExperimentConfig, rep: Replicate, session: Session
              ) -> dict[str, dict[str, State]]:
    """Artefact name -> client id -> the model that client attacks, for one replicate
    (``cfg``: the study's config; baselines at their first seed)."""
    out: dict[str, dict[str, State]] = {}
    teachers = teacher_states(rep.storage)
    if teachers:
        out[TEACHER] = teachers
    out[cfg.strategy.name] = reported_states(rep.cfg, rep.storage, session, rep.base)
    ev = cfg.evaluation
    for name in ev.baselines:
        seed = (ev.baseline_seeds or (rep.seed,))[0]
        bcfg = replace(rep.cfg, seed=seed, name=f"{cfg.name}-{name}",
                       strategy=ev.baseline_strategy(name, cfg.baseline_rounds(name)))
        folder = Storage(f"{rep.storage.uri}/baselines/{name}-seed{seed}")
        out[name] = reported_states(bcfg, folder, session, rep.base)
    return out


def audit_replicate(cfg: ExperimentConfig, rep: Replicate, session: Session,
                    results: Results) -> dict[str, Any]:
    """Run the audit of one replicate at every client; rows into ``results``.

    Returns
    -------
    dict
        The step's record: ``artefacts`` (name -> clients attacked), ``failures`` (the
        failed calls with their reasons) and ``missing`` (artefacts that were not
        attacked, and why).
    """
    infos = session.actors.infos()
    cids = sorted(c for c in infos if c != POOLED_CID)
    config = {"split": cfg.evaluation.split, "max_samples": MAX_AUDIT_SAMPLES,
              "seed": rep.seed}
    models = artefacts(cfg, rep, session)
    missing = {}
    at_home = TEACHER not in models and cfg.privacy.transfer != "weights"
    if at_home:  # the teachers stayed home: each client attacks the one it kept
        models = {TEACHER: {cid: {} for cid in cids}, **models}
    elif TEACHER not in models:
        missing[TEACHER] = "no teacher was kept (the main run ran without the audit)"
    failures: list[dict[str, Any]] = []
    attacked: dict[str, int] = {}
    for name, states in models.items():
        method = f"{PREFIX}{name}"
        results.drop(method, replicate=rep.index)
        own = {"kept_teacher": True} if at_home and name == TEACHER else {}
        instructions = {cid: FitIns(state=states[cid], config={**config, **own})
                        for cid in cids if cid in states}
        done, failed = session.actors.run("audit", instructions)
        for cid, reason in sorted(failed.items()):
            logger.warning("audit of %s at %s failed: %s", name, cid, reason)
            failures.append({"method": method, "client": cid, "reason": str(reason)[:2000]})
        for cid, res in sorted(done.items()):
            for domain, metrics in res.metrics.items():
                results.add(method, rep.seed, cid, domain, metrics, replicate=rep.index)
        attacked[name] = len(done)
        logger.info("replicate %d: audited %s at %d client(s)", rep.index, name, len(done))
    return {"artefacts": attacked, "failures": failures, "missing": missing}


def privacy_summary(cfg: ExperimentConfig, results: Results) -> dict[str, Any]:
    """The summary's ``privacy`` section: the privacy setting the run used, the attack, and
    per domain and artefact the attack's AUC, TPR at 1% FPR, advantage and the artefact's
    utility (AUC on the held-out split), each a cell over replicates."""
    transfer, dp = cfg.privacy.transfer, cfg.privacy.dp
    names = [TEACHER, cfg.strategy.name, *cfg.evaluation.baselines]
    guarantee = f", DP-SGD target epsilon {dp.epsilon:g}" if dp.enabled else ""
    post = ", post-processing of DP outputs" if dp.enabled else ""
    status = {TEACHER: ("left the client (weights" if transfer == "weights"
                        else f"stayed home ({transfer}; attacked there as a reference")
                       + f"{guarantee})",
              cfg.strategy.name: f"released by the server (the main run's global model{post})"}
    for name in cfg.evaluation.baselines:
        status[name] = f"released by the server ({name}'s global model{post})"
    why = {TEACHER: ("the clients no longer held it: their actors restarted since the "
                     "main run" if transfer != "weights"
                     else "no copy was kept: the main run ran without the audit")}
    tables = {m: results.table(m) for m in METRICS}
    domains: dict[str, dict[str, dict[str, Any]]] = {}
    for domain in cfg.data.domains:
        for name in names:
            cells = {m: tables[m].get(f"{PREFIX}{name}", {}).get(domain) for m in METRICS}
            if any(cells.values()):
                domains.setdefault(domain, {})[name] = {m: c for m, c in cells.items() if c}
    return {"transfer": transfer, "dp": to_dict(cfg.privacy.dp), "attack": ATTACK,
            "members": f"the client's train split (a seeded sample of at most "
                       f"{MAX_AUDIT_SAMPLES})",
            "nonmembers": f"the client's {cfg.evaluation.split} split, as many as members",
            "nonmember_split": cfg.evaluation.split, "low_fpr": LOW_FPR,
            "artefacts": [_artefact(n, status[n], any(n in rows for rows in domains.values()),
                                    why.get(n, "every client's audit of it failed"))
                          for n in names],
            "domains": domains}


def _artefact(name: str, status: str, attacked: bool, why_not: str) -> dict[str, Any]:
    """One artefact's entry of the privacy summary; ``why_not`` only when it was not
    attacked."""
    entry: dict[str, Any] = {"name": name, "status": status, "attacked": attacked}
    if not attacked:
        entry["why_not"] = why_not
    return entry
