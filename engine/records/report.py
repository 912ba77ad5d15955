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


def _num(value: Any) -> float:
    """``value`` as a float; NaN for None or a missing value."""
    return math.nan if value is None else float(value)


def _has_ci(cell: dict[str, Any]) -> bool:
    """Whether a summary cell carries a finite CI over more than one value."""
    return cell.get("n", 0) > 1 and not (math.isnan(_num(cell.get("ci_low")))
                                         or math.isnan(_num(cell.get("ci_high"))))


def _fmt(cell: dict[str, Any] | None) -> str:
    """A table cell: ``mean [low, high]`` (95% CI) when it has one, else the mean (old
    summaries without CI keys too)."""
    if not cell or math.isnan(_num(cell.get("mean"))):
        return "–"
    if _has_ci(cell):
        return f"{cell['mean']:.3f} [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"
    return f"{cell['mean']:.3f}"


def _p(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3g}"


def _ci(pair: Any) -> str:
    """A ``[low, high]`` difference interval, or a dash."""
    if not pair or any(math.isnan(_num(x)) for x in pair):
        return "–"
    return f"[{pair[0]:+.4f}, {pair[1]:+.4f}]"


def _diff(value: Any) -> str:
    return "–" if math.isnan(_num(value)) else f"{value:+.4f}"


def _save(storage: Storage, name: str, fig: Any) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(name, buf.getvalue())


def _errors(cell: dict[str, Any]) -> tuple[float, float]:
    """Asymmetric error bar (below, above) of a cell: its CI half-widths, or none."""
    if not _has_ci(cell):
        return 0.0, 0.0
    return cell["mean"] - cell["ci_low"], cell["ci_high"] - cell["mean"]


def plot_auc(storage: Storage, summary: dict[str, Any], domains: list[str]) -> None:
    """Grouped bars: per-domain test AUC of every method, error bars the 95% CI over
    replicates (none for a cell without one); a dashed chance line at 0.5."""
    methods = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(domains)), 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = summary["methods"][method]
        xs, ys, lo, hi = [], [], [], []
        for j, d in enumerate(domains):
            if d in rows and "auc" in rows[d]:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(rows[d]["auc"]["mean"])
                below, above = _errors(rows[d]["auc"])
                lo.append(below)
                hi.append(above)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=method)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(domains)), domains, rotation=20)
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Per-domain test AUC by method: mean and 95% CI over replicates")
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
    runs = [("", "")] + [(f"replicates/{r}/", f"r{r} ")
                         for r in sorted(storage.listdir("replicates"), key=str)]
    for folder, tag in runs:
        if storage.exists(f"{folder}distill_curves.json"):
            for rnd, curve in json.loads(storage.read_text(f"{folder}distill_curves.json")
                                         ).items():
                curves[f"{tag}round {rnd}"] = curve
    for name in sorted(storage.listdir("progress")):
        step = name.removesuffix(".done")
        replicate, _, rest = step.partition("-lodo-")
        if step.startswith("lodo-") or rest:
            info = json.loads(storage.read_text(f"progress/{name}"))
            held = step[5:] if step.startswith("lodo-") else f"{rest} ({replicate})"
            if info.get("curve"):
                curves[f"LODO {held}"] = info["curve"]
    return curves


def _metric_table(methods: dict[str, Any], domains: list[str], metric: str) -> list[str]:
    """The per-domain table of one metric, with the mean over domains last."""
    lines = [f"## Test {metric.upper()} per domain (mean [95% CI] over replicates)", "",
             "A cell is the mean and its t-based 95% confidence interval over replicates "
             "(over the evaluation seeds where a run has a single replicate); a lone value "
             "has no interval.", "",
             "| method | " + " | ".join(domains) + " | mean |",
             "|---|" + "---|" * (len(domains) + 1)]
    for method, rows in methods.items():
        cells = [_fmt(rows.get(d, {}).get(metric)) for d in domains]
        vals = [rows[d][metric]["mean"] for d in domains if d in rows and metric in rows[d]]
        mean = f"{sum(vals) / len(vals):.3f}" if vals else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
    return [*lines, ""]


_TEST_HEAD = ("| comparison | metric | test over | pairs | mean diff | 95% CI | win rate | "
              "Wilcoxon p | Wilcoxon p (a > b) | t-test p | t-test p (a > b) | Holm p | "
              "primary |")


def _test_cells(t: dict[str, Any] | None) -> tuple[str, str]:
    """The pair count, and the win rate and four p-values (as table cells), of a
    :func:`~engine.records.stats.paired_tests` dict."""
    t = t or {}
    win = _num(t.get("win_rate"))
    return str(t.get("n", "–")), (
        f"{'–' if math.isnan(win) else f'{win:.2f}'} | {_p(t.get('wilcoxon_p'))} | "
        f"{_p(t.get('wilcoxon_p_greater'))} | {_p(t.get('ttest_p'))} | "
        f"{_p(t.get('ttest_p_greater'))}")


def _comparison_rows(c: dict[str, Any]) -> list[str]:
    """Table rows of one comparison: one per unit tested (new format) or the old row."""
    name = f"{c['a']} vs {c['b']}" + (f" ({c['mode']})" if c.get("mode") else "")
    diff = _diff(c.get("mean_diff"))
    if "over_domains" not in c and "over_units" not in c:  # the old flat format
        n, rest = _test_cells(c)
        return [f"| {name} | {c['metric']} | (domain, seed) pairs | {n} | {diff} | – | "
                f"{rest} | – | – |"]
    primary = "yes" if c.get("primary") else ""
    n, rest = _test_cells(c.get("over_domains"))
    rows = [f"| {name} | {c['metric']} | domains (mean over replicates) | {n} | {diff} | "
            f"{_ci(c.get('ci95'))} | {rest} | {_p(c.get('holm_p'))} | {primary} |"]
    n, rest = _test_cells(c.get("over_units"))
    rows.append(f"| ″ | ″ | (domain, replicate) units | {n} | | | {rest} | | |")
    return rows


def _comparisons(comparisons: list[dict[str, Any]]) -> list[str]:
    """The paired-tests section."""
    lines = ["## Paired tests", "",
             "Differences are `a - b`. *domains*: one pair per domain, each method's mean over "
             "replicates (the conservative test); *(domain, replicate) units*: one pair per "
             "replicate of a domain, valid because replicates are independent pipelines. "
             "95% CI: hierarchical bootstrap (domains, then replicates within a domain) of "
             "the mean difference. Holm p: the one-sided p of the comparison's primary test, "
             "Holm-adjusted across the comparisons reported.", "",
             _TEST_HEAD, "|---" * 13 + "|"]
    for c in comparisons:
        lines += _comparison_rows(c)
    return [*lines, ""]


def _verdict(claim: dict[str, Any]) -> list[str]:
    """The verdict on the pre-registered primary comparison (new and old summaries)."""
    verdict = "held" if claim.get("held") else "did NOT hold"
    head = ["## The paper's claim", "",
            f"Pre-registered primary comparison: {claim['comparison']}"
            + (f" ({claim['mode']})" if claim.get("mode") else "") + "."]
    if "p" in claim or "holm_p" in claim or "ci95" in claim:
        test = claim.get("test") or "primary test"
        body = (f"Mean AUC difference {_diff(claim.get('mean_diff'))}, 95% CI "
                f"{_ci(claim.get('ci95'))}; {test}: one-sided p = {_p(claim.get('p'))}, "
                f"Holm-adjusted p = {_p(claim.get('holm_p'))}. "
                f"The claim **{verdict}** on this run.")
    else:
        body = (f"Mean AUC difference {_diff(claim.get('mean_diff'))}, one-sided Wilcoxon "
                f"p = {_p(claim.get('wilcoxon_p_greater'))}. At p < 0.05 the claim "
                f"**{verdict}** on this run.")
    return [*head, body, ""]


def _protocol(summary: dict[str, Any]) -> list[str]:
    """What the study held fixed: replicates, budgets, the pool, the primary comparison."""
    if "budgets" not in summary:
        return []
    seeds = summary.get("replicate_seeds", [summary.get("seed", 0)])
    budgets = summary["budgets"]
    lines = ["## Protocol", "",
             f"- Replicates: {summary.get('replicates', 1)} independent whole pipelines "
             f"(seeds {seeds}): each its own MIM base, main run, baselines and evaluations.",
             "- Client-epoch budget of every arm (epochs each client trains over a run): "
             + ", ".join(f"{k} {v}" for k, v in budgets.get("client_epochs", {}).items())
             + f"; evaluation fine-tuning {budgets.get('evaluation_epochs')} epoch(s), "
               f"linear probe {budgets.get('probe_epochs')}.",
             "- Round reported by every federated arm (the same rule for all): "
             f"`{summary.get('select_rule', 'not recorded')}`."]
    pool = summary.get("pool") or {}
    if pool:
        held = "; ".join(pool.get("sources", []))
        counts = pool.get("composition")
        lines.append(f"- The server's unlabelled pool: {held}"
                     + (f" (cap {pool['cap']})" if pool.get("cap") else "")
                     + (": " + ", ".join(f"{k} {v}" for k, v in counts.items())
                        if counts else "") + ".")
    primary = summary.get("primary")
    if primary:
        lines.append(f"- Pre-registered primary comparison: `{primary['a']}` > `{primary['b']}`"
                     f" by {primary['mode']} at {primary['label_fraction']:g} of the labels, "
                     f"{primary['metric'].upper()}, one-sided {primary['test']} over "
                     f"{primary['unit']}, Holm-corrected.")
    return [*lines, ""]


def write_report(run_dir: str) -> str:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report's path."""
    storage = Storage(run_dir)
    if not storage.exists("summary.json"):
        raise FileNotFoundError(f"{run_dir} has no summary.json: is the run finished?")
    summary = json.loads(storage.read_text("summary.json"))
    domains = list(summary["domains"])
    split = summary.get("scored_split", "test")
    lines = [f"# umim report: {summary['name']}", "",
             f"Strategy `{summary['strategy']}`, {summary['rounds']} round(s), seed "
             f"{summary.get('seed', 0)}; base encoder: {summary.get('base', {}).get('method')}.",
             f"Every number below is a {split} metric computed by a client on its own {split} "
             "split and returned as a scalar; the server never saw an image or a label.", ""]
    if split != "test":
        lines += [f"**A tuning run**: everything was scored on the {split} split "
                  "(`evaluation.split`); these numbers choose a recipe, they are not results.",
                  ""]
    lines += _protocol(summary)
    if summary.get("methods"):
        plot_auc(storage, summary, domains)
        for metric in ("auc", "acc"):
            lines += _metric_table(summary["methods"], domains, metric)
        lines += [f"![per-domain AUC]({PLOT_AUC})", ""]
    if summary.get("comparisons"):
        lines += _comparisons(summary["comparisons"])
    if summary.get("claim"):
        lines += _verdict(summary["claim"])
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
