"""The universal strategy end to end: the README's quickstart, its report and a privacy audit
of every object that left a client."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cli import main as cli
from engine.config import load_config
from engine.fl.simulation import Callback
from engine.nn.models import build_model
from engine.run.study import resume, run
from engine.train.mim import pool_composition
from strategies.types import ClientInfo, EvaluateRes, FitRes

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]
METHODS = ["universal", "fedavg", "fedprox", "local", "centralised",
           *(f"{arm}+{tag}" for tag in ("ft", "lp", "knn") for arm in ("universal", "mim",
                                                                         "merged")),
           *(f"lodo:{arm}+{tag}" for tag in ("ft", "lp", "knn") for arm in ("universal", "mim"))]


class PrivacyAudit(Callback):
    """Records every object a client actor sends back to the driver."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, Any]] = []

    def on_client_message(self, cid: str, method: str, message: Any) -> None:
        self.messages.append((cid, method, message))


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float | bool) and not isinstance(value, torch.Tensor)


def _assert_weights_only(state: dict[str, torch.Tensor], reference: dict[str, torch.Size]
                         ) -> None:
    for key, tensor in state.items():
        assert key in reference, f"{key} is not a model weight"
        assert tensor.shape == reference[key], f"{key} has shape {tensor.shape}"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory, data_root: Path, shard_cache: Path
               ) -> tuple[Path, Any, PrivacyAudit]:
    audit = PrivacyAudit()
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", [f"data.cache_dir={shard_cache}"])
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = run(cfg, out=out, data_root=str(data_root), quiet=True, callbacks=[audit])
    return out, result, audit


def test_quickstart_reports_every_method_and_domain(quickstart: tuple[Path, Any, PrivacyAudit]
                                                    ) -> None:
    out, result, _ = quickstart
    summary = json.loads((out / "summary.json").read_text())
    domains = load_config(REPO / "experiments" / "quickstart.yaml").data.domains
    assert sorted(summary["methods"]) == sorted(METHODS)
    for method in METHODS:
        expected = ["breast"] if method.startswith("lodo") else list(domains)
        rows = summary["methods"][method]
        assert sorted(rows) == sorted(expected), method
        for domain in expected:
            auc = rows[domain]["auc"]["mean"]
            assert 0.0 <= auc <= 1.0 and not math.isnan(auc), (method, domain)
    assert summary["methods"]["mim+ft"]["breast"]["auc"]["n"] == 2  # one replicate: 2 seeds
    downstream = [c for c in summary["comparisons"] if c["kind"] == "downstream"]
    assert {c["metric"] for c in downstream} == {"auc", "acc"}
    assert {(c["a"], c["b"]) for c in downstream} == {
        (f"universal+{t}", f"{b}+{t}") for t in ("ft", "lp", "knn") for b in ("mim", "merged")}
    # one replicate: the units are the 8 domains (the seeds are averaged within a unit)
    assert all(c["over_units"]["n"] == 8 and c["n_replicates"] == 1 for c in downstream)
    first = downstream[0]
    assert 0.0 <= first["over_units"]["wilcoxon_p"] <= 1.0 and first["ci95"][0] <= first["ci95"][1]
    for c in summary["comparisons"]:  # LODO on one domain: no test, so no Holm p either
        if c["metric"] == "auc" and not math.isnan(c["p"]):
            assert c["p"] <= c["holm_p"] <= 1.0, c
        elif c["metric"] == "auc":
            assert math.isnan(c["holm_p"]) and c["kind"] == "leave-one-domain-out", c
    primary = [c for c in summary["comparisons"] if c["primary"]]
    assert [(c["a"], c["b"], c["metric"]) for c in primary] == [("universal+ft", "mim+ft", "auc")]
    assert summary["claim"]["holm_p"] == primary[0]["holm_p"]
    assert isinstance(summary["claim"]["held"], bool)
    budgets = summary["budgets"]["client_epochs"]
    assert set(budgets.values()) == {3} and set(budgets) == {"universal", "fedavg", "fedprox",
                                                             "local", "centralised"}
    assert summary["base"]["method"] == "mim" and len(summary["base"]["curve"]) == 3
    curves = json.loads((out / "distill_curves.json").read_text())
    assert sorted(curves) == ["1", "2"] and all(0 <= r["agreement"] <= 1 for r in curves["1"])
    # knowledge accumulates: after stage two the global model has all eight heads
    heads = {k.split(".")[1] for k in result.strategy_state["global_heads"]}
    assert heads == set(domains)

    assert cli(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in [*METHODS, *domains, "Wilcoxon", "Pre-registered primary comparison"]:
        assert name in report, name
    for png in ("auc_by_method.png", "distill_curves.png", "mim_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_weights_and_scalar_metrics_leave_the_clients(
        quickstart: tuple[Path, Any, PrivacyAudit], data_root: Path) -> None:
    out, _, audit = quickstart
    cfg = load_config(out / "config.yaml")
    domains = cfg.data.domains
    infos = {cid: m for cid, method, m in audit.messages if method == "infos"}
    heads = {d: infos[d].num_classes[d] for d in domains}
    reference = {k: v.shape for k, v in build_model(cfg.model, heads).state_dict().items()}
    methods = {method for _, method, _ in audit.messages}
    assert methods == {"infos", "fit", "evaluate", "finetune"}
    private = {info.num_train for info in infos.values()}

    @functools.cache
    def pool_size() -> int:  # the public pool as the distillation reads it (ids only)
        data = dataclasses.replace(cfg.data, data_root=str(data_root))
        return sum(pool_composition(data).values())

    for cid, method, message in audit.messages:
        if method == "infos":
            assert isinstance(message, ClientInfo)
            assert all(isinstance(v, str) for v in message.tasks.values())
            assert all(isinstance(v, int) for v in message.num_classes.values())
            assert isinstance(message.num_train, int)
        elif method == "fit":
            assert isinstance(message, FitRes) and message.cid == cid
            _assert_weights_only(message.state, reference)
            assert all(_is_scalar(v) for v in message.metrics.values())
            assert isinstance(message.num_examples, int)
            scores = message.pool_scores
            if scores is not None:  # one float per PUBLIC pool image, nothing per private one
                assert isinstance(scores, torch.Tensor) and scores.is_floating_point()
                assert scores.shape == (pool_size(),), scores.shape
                assert pool_size() not in private  # the check can tell the two apart
                assert bool(((scores >= 0) & (scores <= 1)).all())
        else:  # evaluate and finetune return metrics only
            assert isinstance(message, EvaluateRes)
            for metrics in message.metrics.values():
                assert all(_is_scalar(v) for v in metrics.values())
        assert set(vars(message)) <= {"cid", "state", "num_examples", "metrics", "split",
                                      "domains", "tasks", "num_classes", "num_train",
                                      "pool_scores"}


def test_a_finished_run_resumes_without_redoing_work(
        quickstart: tuple[Path, Any, PrivacyAudit]) -> None:
    out, result, _ = quickstart
    before = (out / "results.parquet").read_bytes()
    again = resume(out, quiet=True)
    assert (out / "results.parquet").read_bytes() == before
    assert again.summary["methods"] == result.summary["methods"]
