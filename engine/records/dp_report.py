"""The report's differential-privacy section: each client's spent epsilon, from the runs'
histories (the ``dp_*`` metrics of the ``fit`` phase, :mod:`engine.fl.dpsgd`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.records.history import History, Record
from engine.records.storage import Storage

GUARANTEES = (
    "DP-SGD protects each client's *train* images: the epsilon below bounds what everything "
    "the client released in that run reveals about any one of them: its fine-tuned weights "
    "(`privacy.transfer: weights`) or its teacher's outputs on the public pool "
    "(`predictions`). The server's models (the global model, the FedAvg average, the "
    "distilled student) are post-processing of those DP releases and of public data, so they "
    "carry the same per-client guarantee. Not covered: the val split (clients choose their "
    "best epoch on it, `select_on_val`), the evaluation fine-tuning and audit at a client "
    "(nothing but scores leaves it, and they are not DP), and composition across the runs "
    "of a study (each run, main and every baseline, is accounted on its own). Sampling: "
    "Poisson (Opacus's `UniformWithReplacementSampler`), what the accountant assumes; noise "
    "from the global torch generator (Opacus's `secure_mode` off).")


def dp_rows(records: Iterable[Record]) -> dict[str, dict[str, float]]:
    """Client -> its last ``dp_epsilon`` and ``dp_delta``, total ``dp_steps``, and the
    ``dp_noise_multiplier`` / ``dp_sample_rate`` / ``dp_max_grad_norm`` of its last fit
    (empty when the run did not train under DP)."""
    out: dict[str, dict[str, float]] = {}
    last: dict[tuple[str, str], int] = {}
    for r in records:
        if r.phase != "fit" or not r.metric.startswith("dp_"):
            continue
        row = out.setdefault(r.client, {"dp_steps": 0.0})
        if r.metric == "dp_steps":
            row["dp_steps"] += r.value
        elif r.round >= last.get((r.client, r.metric), -1):
            row[r.metric] = r.value
            last[(r.client, r.metric)] = r.round
    return {c: row for c, row in out.items() if "dp_epsilon" in row}


def dp_section(runs: Iterable[tuple[str, int, History]],
               target: dict[str, Any] | None = None) -> list[str]:
    """The Markdown section (empty when no run trained under DP).

    Parameters
    ----------
    runs
        ``(method, replicate, history)`` of every federated run of the study.
    target
        The ``privacy.dp`` settings, to state the target beside the spent epsilon.
    """
    tables = [(method, rep, dp_rows(history.records)) for method, rep, history in runs]
    tables = [t for t in tables if t[2]]
    if not tables:
        return []
    lines = ["## Differential privacy (DP-SGD)", ""]
    if target:
        lines += [f"Target per client and run: epsilon={target.get('epsilon')}, delta="
                  f"{target.get('delta') or '1/(10 n)'}, clipping norm "
                  f"{target.get('max_grad_norm')}, accountant `{target.get('accountant')}`.",
                  ""]
    lines += [GUARANTEES, "",
              "| run | replicate | client | spent epsilon | delta | noise multiplier | "
              "sampling rate | DP steps |", "|---" * 8 + "|"]
    for method, rep, rows in tables:
        for client, row in sorted(rows.items()):
            lines.append(f"| {method} | {rep} | {client} | {row['dp_epsilon']:.3f} | "
                         f"{row.get('dp_delta', float('nan')):.3g} | "
                         f"{row.get('dp_noise_multiplier', float('nan')):.4g} | "
                         f"{row.get('dp_sample_rate', float('nan')):.4g} | "
                         f"{int(row['dp_steps'])} |")
    return [*lines, ""]


def dp_section_of(storage: Storage, histories: Iterable[tuple[str, int, int, str]]
                  ) -> list[str]:
    """:func:`dp_section` of a run directory: ``histories`` are ``(method, replicate, seed,
    history path)`` (the report's list of a study's runs); the target is read from the
    run's ``config.yaml`` when it has one."""
    import yaml

    runs = [(method, rep, History.from_parquet_bytes(storage.read_bytes(path)))
            for method, rep, _, path in histories]
    target = None
    if storage.exists("config.yaml"):
        cfg = yaml.safe_load(storage.read_text("config.yaml")) or {}
        target = (cfg.get("privacy") or {}).get("dp")
    return dp_section(runs, target)
