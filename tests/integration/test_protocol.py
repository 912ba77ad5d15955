"""The study protocol end to end: independent replicates of the whole pipeline, equal
budgets, every encoder judged in every mode, leave-one-domain-out out of domain, and the
statistics over independent units."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from engine.cli import main as cli
from engine.config import load_config
from engine.records.checkpoint import latest_checkpoint
from engine.records.storage import Storage
from engine.run.study import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "data.domains=[breast,pneumonia,ct-region]", "data.max_train_samples=64",
    "data.max_eval_samples=32", "data.pool_size=300", "pretrain.epochs=1",
    "pretrain.batch_size=64", "strategy.num_stages=1", "strategy.local_epochs=2",
    "train.local_epochs=1", "distill.steps=20", "distill.eval_every=10",
    "evaluation.replicates=2", "evaluation.encoders=[main,base,random,merged,fedavg]",
    "evaluation.modes=[linear_probe,knn,finetune]", "evaluation.label_fractions=[0.25,1.0]",
    "evaluation.finetune_epochs=1", "evaluation.probe_epochs=5", "evaluation.seeds=[0]",
    "evaluation.lodo_domains=[breast]", "evaluation.baselines=[fedavg,local]",
    "evaluation.select_round=best_val",
    "evaluation.primary={a: main, b: base, mode: linear_probe}",
    "evaluation.privacy_audit=true",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, data_root: Path, shard_cache: Path
          ) -> tuple[Path, Path, Any]:
    cache = shard_cache
    cfg = load_config(REPO / "experiments" / "quickstart.yaml",
                      [*OVERRIDES, f"data.cache_dir={cache}"])
    out = tmp_path_factory.mktemp("protocol") / "run"
    result = run(cfg, out=out, data_root=str(data_root), quiet=True)
    return out, cache, result


def test_a_replicate_reseeds_the_base_and_the_federated_run(study: tuple[Path, Path, Any]
                                                            ) -> None:
    out, cache, _ = study
    summary = json.loads((out / "summary.json").read_text())
    assert [b["seed"] for b in summary["bases"]] == [0, 1]  # one MIM base per replicate
    prints = [b["fingerprint"] for b in summary["bases"]]
    assert len(set(prints)) == 2
    encoders = [torch.load(cache / "bases" / p / "encoder.pt", weights_only=True)
                for p in prints]
    assert any(not torch.equal(encoders[0][k], encoders[1][k]) for k in encoders[0])
    states = [latest_checkpoint(Storage(out / "replicates" / str(r))).strategy["encoder"]
              for r in (0, 1)]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    for r in (0, 1):  # every replicate has its own main run and baselines
        assert (out / "replicates" / str(r) / "history.parquet").exists()
        for name in ("fedavg", "local"):
            assert (out / "replicates" / str(r) / "baselines" / f"{name}-seed{r}"
                    / "encoder.pt").exists()
    rows = pq.read_table(out / "results.parquet").to_pylist()
    methods = {r["method"] for r in rows}
    for method in methods:
        assert {r["replicate"] for r in rows if r["method"] == method} == {0, 1}, method
    assert {"universal+lp", "mim+lp", "random+lp", "merged+lp", "fedavg+lp", "universal+knn",
            "fedavg+ft@25%", "universal+ft", "lodo:universal+lp", "lodo:mim+knn@25%"} <= methods
    few = [r for r in rows if r["method"] == "mim+ft@25%" and r["metric"] == "n_labelled"]
    full = [r for r in rows if r["method"] == "mim+ft" and r["metric"] == "n_labelled"]
    assert few and full and max(r["value"] for r in few) < min(r["value"] for r in full)


def test_budgets_are_equal_and_every_arm_selects_on_val(study: tuple[Path, Path, Any]) -> None:
    out, _, _ = study
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budgets"]["client_epochs"] == {"universal": 2, "fedavg": 2, "local": 2}
    assert summary["replicates"] == 2 and summary["replicate_seeds"] == [0, 1]
    for r in (0, 1):
        for name in ("fedavg", "local"):
            folder = out / "replicates" / str(r) / "baselines" / f"{name}-seed{r}"
            sub = json.loads((folder / "summary.json").read_text())
            assert sub["rounds"] == 2 and 1 <= sub["selected_round"] <= 2


def test_lodo_holds_the_domain_out_of_every_teacher(study: tuple[Path, Path, Any]) -> None:
    out, _, _ = study
    for r in (0, 1):
        info = json.loads((out / "progress" / f"r{r}-lodo-breast.done").read_text())
        assert info["teachers"] == ["ct-region", "pneumonia"]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {r["domain"] for r in rows if r["method"].startswith("lodo:")} == {"breast"}


def test_statistics_are_over_independent_units_with_holm_and_cis(
        study: tuple[Path, Path, Any]) -> None:
    out, _, _ = study
    summary = json.loads((out / "summary.json").read_text())
    comparisons = summary["comparisons"]
    down = [c for c in comparisons if c["kind"] == "downstream" and c["metric"] == "auc"]
    assert len(down) == 3 * 2 * 4  # modes x fractions x the encoders beside main
    for c in down:
        assert c["n_replicates"] == 2 and c["n_domains"] == 3 and c["over_units"]["n"] == 6
        assert c["ci95"][0] <= c["mean_diff"] <= c["ci95"][1]
        assert c["p"] <= c["holm_p"] <= 1.0
    primary = [c for c in comparisons if c["primary"]]
    assert [(c["a"], c["b"]) for c in primary] == [("universal+lp", "mim+lp")]
    claim = summary["claim"]
    assert claim["holm_p"] == primary[0]["holm_p"] and claim["mode"] == "linear_probe"
    assert claim["held"] == (claim["holm_p"] < 0.05 and claim["mean_diff"] > 0)
    cell = summary["methods"]["universal+lp"]["breast"]["auc"]
    assert cell["n"] == 2 and cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
    assert set(summary["heads_vs_local"]) == {"breast", "pneumonia", "ct-region"}


def test_the_report_states_the_protocol(study: tuple[Path, Path, Any]) -> None:
    out, _, _ = study
    assert cli(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    for text in ("## Protocol", "2 independent whole pipelines (seeds [0, 1])",
                 "universal 2, fedavg 2, local 2", "`best_val`", "unlabelled pool",
                 "Pre-registered primary comparison: `main` > `base` by linear_probe",
                 "(domain, replicate) units", "Holm p", "95% CI"):
        assert text in report, text
    assert (out / "distill_curves.png").exists()


def test_the_audit_attacks_every_artefact_at_every_client(study: tuple[Path, Path, Any]
                                                          ) -> None:
    out, _, _ = study
    clients = {"breast", "pneumonia", "ct-region"}
    for r in (0, 1):  # the teachers the clients returned were kept, and the step is marked
        kept = out / "replicates" / str(r) / "audit" / "teachers"
        assert {p.stem for p in kept.glob("*.pt")} == clients
        info = json.loads((out / "progress" / f"r{r}-audit.done").read_text())
        assert info["artefacts"] == {"teacher": 3, "universal": 3, "fedavg": 3, "local": 3}
        assert info["failures"] == [] and info["missing"] == {}
    rows = pq.read_table(out / "results.parquet").to_pylist()
    audit = [r for r in rows if r["method"].startswith("audit:")]
    for method in ("audit:teacher", "audit:universal", "audit:fedavg", "audit:local"):
        mine = [r for r in audit if r["method"] == method]
        assert {(r["client"], r["replicate"]) for r in mine} == {(c, k) for c in clients
                                                                 for k in (0, 1)}, method
        assert all(0.0 <= r["value"] <= 1.0 for r in mine if r["metric"] != "mia_n")
        assert {r["value"] for r in mine if r["metric"] == "mia_n"} == {32.0}  # min(64, 32)
    # the audited global models are the ones the study reports: same test AUC per client
    for name in ("universal", "fedavg"):
        test = {(r["client"], r["replicate"]): r["value"] for r in rows
                if r["method"] == name and r["metric"] == "auc"}
        audited = {(r["client"], r["replicate"]): r["value"] for r in audit
                   if r["method"] == f"audit:{name}" and r["metric"] == "utility_auc"}
        assert audited.keys() == test.keys()
        assert all(abs(audited[k] - test[k]) < 1e-6 for k in test), (name, audited, test)
    teacher = {(r["client"], r["replicate"]): r["value"] for r in audit
               if r["method"] == "audit:teacher" and r["metric"] == "mia_auc"}
    glob = {(r["client"], r["replicate"]): r["value"] for r in audit
            if r["method"] == "audit:universal" and r["metric"] == "mia_auc"}
    assert teacher != glob  # two different models were attacked
    privacy = json.loads((out / "summary.json").read_text())["privacy"]
    assert privacy["transfer"] == "weights" and set(privacy["domains"]) == clients
    assert set(privacy["domains"]["breast"]) == {"teacher", "universal", "fedavg", "local"}
    assert privacy["domains"]["breast"]["teacher"]["mia_auc"]["n"] == 2  # two replicates
    assert cli(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    for text in ("## Privacy: membership-inference audit", "`privacy.transfer: weights`",
                 "| teacher | left the client (weights) |", "### ct-region"):
        assert text in report, text
