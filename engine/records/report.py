"""``umim report RUN_DIR``: a Markdown report with the per-domain table, the paired tests
and PNG plots (per-domain AUC by method, per-round learning curves, distillation curves,
MIM loss), the sweep's plots when the run came from a sweep, and the same report as one
self-contained ``report.html`` (figures embedded, no external fetches)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from engine.records.dp_report import dp_section_of
from engine.records.history import History
from engine.records.results import Results
from engine.records.stats import mean_ci
from engine.records.storage import Storage
from strategies.distill import LOSS_NAMES

if TYPE_CHECKING:
    import pandas as pd

PLOT_AUC = "auc_by_method.png"
PLOT_CURVES = "learning_curves.png"
PLOT_DISTILL = "distill_curves.png"
PLOT_MIM = "mim_loss.png"
HTML_REPORT = "report.html"
ORIGIN = "origin.json"
"""Where the run's config came from (``{"config_file": ...}``, written by ``umim run``)."""
SWEEP_PLOTS = ("objective.png", "importance.png")


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
    ax.legend(fontsize=7, ncol=min(len(methods) + 1, 6), loc="upper center",
              bbox_to_anchor=(0.5, -0.2), frameon=False)
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
            values = [r.get(term, math.nan) for r in curve]
            if any(v > 0 for v in values):  # a term that is off (always 0) has no line
                ax2.plot(steps, [v if v > 0 else math.nan for v in values], color=color,
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


def _dp_text(dp: dict[str, Any]) -> str:
    """The DP setting of a run as the privacy section states it."""
    if not dp.get("enabled"):
        return "off"
    return "on, " + ", ".join(f"{k}={v}" for k, v in dp.items() if k != "enabled")


def _privacy(privacy: dict[str, Any]) -> list[str]:
    """The privacy section: the setting the run used, the attack, and per domain every
    audited artefact's attack AUC, TPR at low FPR and advantage beside its utility."""
    utility = privacy.get("nonmember_split", "held-out")
    fpr = f"{privacy.get('low_fpr', 0.01) * 100:g}%"
    status = {a["name"]: a["status"] for a in privacy.get("artefacts", [])}
    domains = privacy.get("domains", {})
    lines = ["## Privacy: membership-inference audit", "",
             f"Privacy setting of this run: `privacy.transfer: {privacy.get('transfer')}`, "
             f"DP-SGD: {_dp_text(privacy.get('dp') or {})}.",
             f"Attack: {privacy.get('attack')}, run by every client on its own data; members: "
             f"{privacy.get('members')}; non-members: {privacy.get('nonmembers')}. Only the "
             f"attack's AUC (0.5: no leak), its TPR at {fpr} FPR and its advantage "
             "(max TPR - FPR) left the client. Utility: the artefact's AUC on the "
             "non-member split.", ""]
    not_attacked = [a for a in privacy.get("artefacts", []) if not a.get("attacked")]
    for a in not_attacked:
        lines.append(f"- `{a['name']}` ({a['status']}): not attacked ({a.get('why_not')}).")
    if not_attacked:
        lines.append("")
    head = (f"| artefact | status | attack AUC | TPR at {fpr} FPR | advantage | "
            f"{utility} AUC (utility) |")
    names = [a["name"] for a in privacy.get("artefacts", []) if a.get("attacked")]
    lines += ["Mean over domains:", "", head, "|---" * 6 + "|"]
    for name in names:
        cells = [[rows[name][m]["mean"] for rows in domains.values()
                  if name in rows and m in rows[name]]
                 for m in ("mia_auc", "mia_tpr_at_1fpr", "mia_advantage", "utility_auc")]
        means = " | ".join(f"{sum(v) / len(v):.3f}" if v else "–" for v in cells)
        lines.append(f"| {name} | {status.get(name, '')} | {means} |")
    lines.append("")
    for domain, rows in domains.items():
        lines += [f"### {domain}", "", head, "|---" * 6 + "|"]
        for name, cells in rows.items():
            lines.append(f"| {name} | {status.get(name, '')} | "
                         + " | ".join(_fmt(cells.get(m)) for m in
                                      ("mia_auc", "mia_tpr_at_1fpr", "mia_advantage",
                                       "utility_auc")) + " |")
        lines.append("")
    return lines


def _histories(storage: Storage, summary: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """(method, replicate, seed, history path) of every federated run of a study: each
    replicate's main run and baselines (``baselines/<name>-seed<k>/``)."""
    reps = sorted(storage.listdir("replicates"), key=lambda r: int(r) if r.isdigit() else 0)
    folders = [(f"replicates/{r}/", int(r)) for r in reps if r.isdigit()] or [("", 0)]
    seed0 = int(summary.get("seed", 0))
    out = []
    for folder, rep in folders:
        if storage.exists(f"{folder}history.parquet"):
            out.append((str(summary["strategy"]), rep, seed0 + rep,
                        f"{folder}history.parquet"))
        for name in storage.listdir(f"{folder}baselines"):
            method, _, seed = name.rpartition("-seed")
            path = f"{folder}baselines/{name}/history.parquet"
            if method and seed.isdigit() and storage.exists(path):
                out.append((method, rep, int(seed), path))
    return out


def learning_curves(run_dir: str) -> pd.DataFrame:
    """Per-round federated validation AUC of every federated run of a study, per domain.

    Parameters
    ----------
    run_dir
        The run directory (a finished or running study).

    Returns
    -------
    pandas.DataFrame
        Long format, one row per (method, replicate, seed, round, domain): ``auc`` is the
        mean over the domain's clients of the global model's val AUC after that round
        (``phase == "val"`` records of each ``history.parquet``; NaN values left out).
        The main run's method is its strategy's name, a baseline's its own.
    """
    import pandas as pd

    storage = Storage(run_dir)
    summary = json.loads(storage.read_text("summary.json")) if storage.exists(
        "summary.json") else {"strategy": "main", "seed": 0}
    frames = []
    for method, rep, seed, path in _histories(storage, summary):
        df = History.from_parquet_bytes(storage.read_bytes(path)).to_pandas()
        df = df[(df["phase"] == "val") & (df["metric"] == "auc") & df["value"].notna()]
        if df.empty:
            continue
        per = df.groupby(["round", "domain"], as_index=False)["value"].mean()
        frames.append(per.rename(columns={"value": "auc"}).assign(
            method=method, replicate=rep, seed=seed))
    columns = ["method", "replicate", "seed", "round", "domain", "auc"]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c == "auc" else
                                          "int64" if c in ("replicate", "seed", "round")
                                          else "object") for c in columns})
    out = pd.concat(frames, ignore_index=True)[columns]
    return out.astype({"replicate": "int64", "seed": "int64", "round": "int64"})


def plot_learning_curves(storage: Storage, curves: pd.DataFrame, domains: list[str]) -> None:
    """One panel per domain: every federated method's val AUC against the round, the mean
    over replicates and seeds with its 95% CI band where there is more than one; the full
    AUC axis with the chance line."""
    shown = [d for d in domains if d in set(curves["domain"])] + sorted(
        set(curves["domain"]) - set(domains))
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    height = 2.6 * nrows + 0.6  # 0.6 in above the panels: the title and the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, height), sharey=True,
                             squeeze=False)
    methods = list(dict.fromkeys(curves["method"]))
    for ax, domain in zip(axes.flat, shown, strict=False):
        part = curves[curves["domain"] == domain]
        for i, method in enumerate(methods):
            rows = part[part["method"] == method]
            if rows.empty:
                continue
            rounds = sorted(set(rows["round"]))
            cis = [mean_ci(rows[rows["round"] == r]["auc"].tolist()) for r in rounds]
            color = f"C{i % 10}"
            ax.plot(rounds, [c[0] for c in cis], color=color, label=method,
                    marker="osD^vP*X"[i % 8], ms=4, linestyle=("-", "--", "-.", ":")[i % 4])
            if any(not math.isnan(c[1]) for c in cis):
                ax.fill_between(rounds, [c[1] for c in cis], [c[2] for c in cis],
                                color=color, alpha=0.15, linewidth=0)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(domain, fontsize=9)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat[len(shown):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("val AUC", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1:len(shown)]:  # a method missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", linewidth=1))
    labels.append("chance")
    fig.suptitle("Federated val AUC of the global model per round", fontsize=10,
                 y=1 - 0.05 / height, va="top")
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 7), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.25 / height), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / height))
    _save(storage, PLOT_CURVES, fig)


def _curves_section(storage: Storage, domains: list[str]) -> list[str]:
    """The learning-curves section (empty when no run recorded a per-round val AUC)."""
    curves = learning_curves(storage.uri)
    if curves.empty:
        return []
    plot_learning_curves(storage, curves, domains)
    n = curves.groupby("method")[["replicate", "seed"]].apply(
        lambda g: len(g.drop_duplicates()))
    runs = ", ".join(f"{m} ({k} run{'s' if k > 1 else ''})" for m, k in n.items())
    return ["## Learning curves", "",
            "Federated validation AUC of each method's global model after every round, per "
            "domain (mean over the domain's clients; over replicates and seeds where there "
            f"are several, with a 95% CI band). Runs: {runs}. A domain joins a staged "
            "method's curve at the round its stage starts. Dashed: chance (0.5).", "",
            f"![learning curves]({PLOT_CURVES})", ""]


def sweep_of(run_dir: str) -> Path | None:
    """The sweep directory a local run came from, or ``None``: the folder of the config
    file the run was started with (``origin.json``, e.g. a sweep's ``best.yaml``) when it
    holds a ``sweep.yaml``, else the nearest folder above the run that holds one (a
    trial's own run directory)."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        return None
    here = Path(run_dir.removeprefix("file://")).resolve()
    candidates = []
    if (here / ORIGIN).exists():
        source = json.loads((here / ORIGIN).read_text()).get("config_file")
        if source:
            candidates.append(Path(source).resolve().parent)
    candidates += list(here.parents)[:6]
    return next((c for c in candidates if (c / "sweep.yaml").is_file()), None)


def _sweep_section(run_dir: str) -> list[str]:
    """Links to the sweep's plots and its best trial, when the run came from a sweep."""
    folder = sweep_of(run_dir)
    if folder is None:
        return []
    here = Path(run_dir.removeprefix("file://")).resolve()
    rel = Path(os.path.relpath(folder, here))
    lines = ["## The sweep this run came from", "",
             f"Sweep directory: [{folder}]({rel.as_posix()}/)."]
    summary = folder / "summary.json"
    if summary.is_file():
        info = json.loads(summary.read_text())
        states = ", ".join(f"{k} {v}" for k, v in (info.get("states") or {}).items())
        lines.append(f"{info.get('trials', '?')} trial(s) ({states}); best trial "
                     f"{info.get('best_trial', '–')}, objective "
                     f"{_p(info.get('best_objective'))} (mean val AUC), parameters "
                     f"`{json.dumps(info.get('best_params', {}), default=str)}`.")
    lines.append("")
    for name in SWEEP_PLOTS:
        if (folder / name).is_file():
            lines += [f"![sweep {name.removesuffix('.png')}]({(rel / name).as_posix()})", ""]
    return lines


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1400px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 12px; display: block;
        overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f6f8; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: .5em 0; }
code { background: #f4f6f8; padding: 1px 4px; border-radius: 3px; font-size: 90%; }
"""


def _data_uri(storage: Storage, run_dir: str, src: str) -> str | None:
    """A ``data:`` URI of a local image referenced by the report, or ``None``."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", src):  # http:, data:, ...: left as it is
        return None
    if storage.exists(src):
        data = storage.read_bytes(src)
    else:
        path = Path(run_dir.removeprefix("file://")) / src
        if "://" in run_dir.removeprefix("file://") or not path.is_file():
            return None
        data = path.read_bytes()
    kind = "image/svg+xml" if src.endswith(".svg") else "image/png"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(markdown_text: str, storage: Storage, title: str) -> str:
    """``report.md``'s text as one self-contained HTML page: tables as HTML, every local
    image embedded as a base64 ``data:`` URI, an inline stylesheet, nothing fetched."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")

    def embed(match: re.Match[str]) -> str:
        uri = _data_uri(storage, storage.uri, html.unescape(match.group(2)))
        return match.group(0) if uri is None else f"{match.group(1)}{uri}{match.group(3)}"

    body = re.sub(r'(<img\b[^>]*\bsrc=")([^"]*)(")', embed, body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def write_report(run_dir: str) -> str:
    """Write ``report.md``, its plots and ``report.html`` (the same report, self-contained)
    into ``run_dir``; returns the Markdown report's path."""
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
    lines += _curves_section(storage, domains)
    if summary.get("comparisons"):
        lines += _comparisons(summary["comparisons"])
    if summary.get("claim"):
        lines += _verdict(summary["claim"])
    if summary.get("privacy"):
        lines += _privacy(summary["privacy"])
    lines += dp_section_of(storage, _histories(storage, summary))  # privacy.dp: spent epsilon
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
    lines += _sweep_section(run_dir)
    text = "\n".join(lines) + "\n"
    storage.write_text("report.md", text)
    storage.write_text(HTML_REPORT, render_html(text, storage, f"umim report: {summary['name']}"))
    return storage.path("report.md")


def results_of(run_dir: str) -> Results:
    """The study's result rows (for notebooks)."""
    return Results.from_parquet_bytes(Storage(run_dir).read_bytes("results.parquet"))
