"""``umim report RUN_DIR``: a Markdown report with the per-domain table, the paired tests
and PNG plots (per-domain AUC by method, distillation curves, MIM loss)."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from engine.records.results import Results
from engine.records.storage import Storage
from strategies.distill import LOSS_NAMES

PLOT_AUC = "auc_by_method.png"
PLOT_DISTILL = "distill_curves.png"
PLOT_MIM = "mim_loss.png"


def _fmt(cell: dict[str, float] | None) -> str:
    if not cell or math.isnan(cell["mean"]):
        return "–"
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}" if cell["n"] > 1 else f"{cell['mean']:.3f}"


def _p(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3g}"


def _save(storage: Storage, name: str, fig: Any) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(name, buf.getvalue())


def plot_auc(storage: Storage, summary: dict[str, Any], domains: list[str]) -> None:
    """Grouped bars: per-domain test AUC of every method, error bars over seeds."""
    methods = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(domains)), 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = summary["methods"][method]
        xs, ys, es = [], [], []
        for j, d in enumerate(domains):
            if d in rows and "auc" in rows[d]:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(rows[d]["auc"]["mean"])
                es.append(rows[d]["auc"]["std"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=method)
    ax.set_xticks(range(len(domains)), domains, rotation=20)
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.4, 1.02)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Per-domain test AUC by method (mean ± std over seeds)")
    _save(storage, PLOT_AUC, fig)


def plot_distill(storage: Storage, curves: dict[str, list[dict[str, float]]]) -> None:
    """Label-free stopping signal (student/teacher agreement) and every named loss term
    (:data:`strategies.distill.LOSS_NAMES`, one line style each) against distillation step."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = ["-", "--", ":", "-."]
    for i, (name, curve) in enumerate(curves.items()):
        steps = [r["step"] for r in curve]
        color = f"C{i % 10}"
        ax1.plot(steps, [r["agreement"] for r in curve], marker="o", color=color, label=name)
        for j, term in enumerate(LOSS_NAMES):
            if all(r.get(term, 0.0) > 0 for r in curve):  # a term that is off has no line
                ax2.plot(steps, [r[term] for r in curve], color=color,
                         linestyle=styles[j % len(styles)], label=f"{name}: {term}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("agreement on held-out pool")
    ax2.set_xlabel("step")
    ax2.set_ylabel("distillation loss, by term")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    _save(storage, PLOT_DISTILL, fig)


def plot_mim(storage: Storage, curve: list[dict[str, float]]) -> None:
    """MIM reconstruction loss per epoch of the base encoder's pretraining."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["epoch"] for r in curve], [r["mim_loss"] for r in curve], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title("MIM pretraining of the base encoder")
    _save(storage, PLOT_MIM, fig)


def _curves(storage: Storage) -> dict[str, list[dict[str, float]]]:
    curves: dict[str, list[dict[str, float]]] = {}
    if storage.exists("distill_curves.json"):
        for rnd, curve in json.loads(storage.read_text("distill_curves.json")).items():
            curves[f"round {rnd}"] = curve
    for name in storage.listdir("progress"):
        if name.startswith("lodo-"):
            info = json.loads(storage.read_text(f"progress/{name}"))
            if info.get("curve"):
                curves[f"LODO {name[5:-5]}"] = info["curve"]
    return curves


def write_report(run_dir: str) -> str:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report's path."""
    storage = Storage(run_dir)
    if not storage.exists("summary.json"):
        raise FileNotFoundError(f"{run_dir} has no summary.json: is the run finished?")
    summary = json.loads(storage.read_text("summary.json"))
    domains = list(summary["domains"])
    lines = [f"# umim report: {summary['name']}", "",
             f"Strategy `{summary['strategy']}`, {summary['rounds']} round(s), seed "
             f"{summary.get('seed', 0)}; base encoder: {summary.get('base', {}).get('method')}.",
             "Every number below is a test metric computed by a client on its own test split "
             "and returned as a scalar; the server never saw an image or a label.", ""]
    if summary.get("methods"):
        plot_auc(storage, summary, domains)
        for metric in ("auc", "acc"):
            lines += [f"## Test {metric.upper()} per domain (mean ± std over seeds)", "",
                      "| method | " + " | ".join(domains) + " | mean |",
                      "|---|" + "---|" * (len(domains) + 1)]
            for method, rows in summary["methods"].items():
                cells = [_fmt(rows.get(d, {}).get(metric)) for d in domains]
                vals = [rows[d][metric]["mean"] for d in domains
                        if d in rows and metric in rows[d]]
                mean = f"{sum(vals) / len(vals):.3f}" if vals else "–"
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
            lines.append("")
        lines += [f"![per-domain AUC]({PLOT_AUC})", ""]
    if summary.get("comparisons"):
        lines += ["## Paired tests (over domains x seeds)", "",
                  "| comparison | metric | pairs | mean diff | win rate | Wilcoxon p | "
                  "Wilcoxon p (a > b) | t-test p | t-test p (a > b) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in summary["comparisons"]:
            lines.append(f"| {c['a']} vs {c['b']} | {c['metric']} | {c['n']} | "
                         f"{c['mean_diff']:+.4f} | {c['win_rate']:.2f} | {_p(c['wilcoxon_p'])} "
                         f"| {_p(c['wilcoxon_p_greater'])} | {_p(c['ttest_p'])} | "
                         f"{_p(c['ttest_p_greater'])} |")
        lines.append("")
    claim = summary.get("claim")
    if claim:
        verdict = "held" if claim["held"] else "did NOT hold"
        lines += ["## The paper's claim", "",
                  f"{claim['comparison']}: mean AUC difference {claim['mean_diff']:+.4f}, "
                  f"one-sided Wilcoxon p = {_p(claim['wilcoxon_p_greater'])}. "
                  f"At p < 0.05 the claim **{verdict}** on this run.", ""]
    curves = _curves(storage)
    if curves:
        plot_distill(storage, curves)
        lines += ["## Distillation", "", f"![distillation curves]({PLOT_DISTILL})", ""]
    mim_curve = summary.get("base", {}).get("curve")
    if mim_curve:
        plot_mim(storage, mim_curve)
        lines += ["## MIM pretraining", "", f"![MIM loss]({PLOT_MIM})", ""]
    if summary.get("fit_samples_per_s"):
        lines += [f"Local training throughput (main run): "
                  f"{summary['fit_samples_per_s']:.0f} samples/s.", ""]
    failures = summary.get("failures") or []
    lines += ["## Client failures", "", f"{len(failures)} recorded." if failures else "None.",
              ""]
    for f in failures[:20]:
        lines.append(f"- round {f['round']}, {f['client']}: {f['kind']}")
    storage.write_text("report.md", "\n".join(lines) + "\n")
    return storage.path("report.md")


def results_of(run_dir: str) -> Results:
    """The study's result rows (for notebooks)."""
    return Results.from_parquet_bytes(Storage(run_dir).read_bytes("results.parquet"))
