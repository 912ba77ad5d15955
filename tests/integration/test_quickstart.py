"""The universal strategy end to end: the README's quickstart, its report and a privacy audit
of every object that left a client."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from export_checks import check_export, check_refused

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
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", [f"data.cache_dir={shard_cache}",
                                                                 "run.tracking=mlflow"])
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
    _audit(load_config(out / "config.yaml"), audit, data_root,
           methods={"infos", "fit", "evaluate", "finetune"})


@pytest.mark.slow
def test_in_predictions_mode_no_weight_shaped_tensor_leaves_a_client(
        tmp_path: Path, data_root: Path, shard_cache: Path) -> None:
    """``privacy.transfer: predictions`` on two real domains, one stage, tiny caps: every
    tensor a client actor returns has one row per public pool image (none is shaped like a
    weight), and the run still distils a global model with both heads. (The Ray-free twin,
    through the actor body, is ``tests/unit/fl/test_pool_outputs.py``.)"""
    audit = PrivacyAudit()
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", [
        f"data.cache_dir={shard_cache}", "data.domains=[breast, retina]",
        "data.max_train_samples=64", "data.max_eval_samples=32", "data.pool_size=300",
        "pretrain.method=none", "strategy.num_stages=1", "strategy.local_epochs=1",
        "distill.steps=10", "distill.eval_every=5", "evaluation.encoders=[main, base]",
        "evaluation.modes=[knn]", "evaluation.finetune_epochs=0",
        "evaluation.lodo_domains=[]", "evaluation.baselines=[]",
        "privacy.transfer=predictions", "evaluation.privacy_audit=true"])
    result = run(cfg, out=tmp_path / "run", data_root=str(data_root), quiet=True,
                 callbacks=[audit])
    assert {k.split(".")[1] for k in result.strategy_state["global_heads"]} == {"breast",
                                                                               "retina"}
    fits = [m for _, method, m in audit.messages if method == "fit"]
    assert fits and all(m.pool_outputs is not None and m.state == {} for m in fits)
    _audit(cfg, audit, data_root, methods={"infos", "fit", "evaluate", "audit"})
    # the membership audit: each teacher attacked where it stayed, the global model too
    rows = result.results.to_pandas()
    audited = rows[rows.method.str.startswith("audit:") & (rows.metric == "mia_auc")]
    assert sorted(map(tuple, audited[["method", "client"]].values)) == [
        ("audit:teacher", "breast"), ("audit:teacher", "retina"),
        ("audit:universal", "breast"), ("audit:universal", "retina")]
    assert audited.value.between(0, 1).all()
    assert not (tmp_path / "run" / "audit" / "teachers").exists()  # the server holds none
    teacher = result.summary["privacy"]["artefacts"][0]
    assert teacher["name"] == "teacher" and teacher["attacked"]
    assert teacher["status"].startswith("stayed home (predictions")


def _audit(cfg: Any, audit: PrivacyAudit, data_root: Path, methods: set[str]) -> None:
    """Everything a client actor returned: its announcement, scalar metrics, weights of the
    model's shapes (``weights``) or, with ``privacy.transfer: predictions``, no weights and
    only tensors with one row per public pool image, none of a weight's shape."""
    domains = cfg.data.domains
    infos = {cid: m for cid, method, m in audit.messages if method == "infos"}
    heads = {d: infos[d].num_classes[d] for d in domains}
    reference = {k: v.shape for k, v in build_model(cfg.model, heads).state_dict().items()}
    assert {method for _, method, _ in audit.messages} == methods
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
            assert message.arch is None or isinstance(message.arch, str)
        elif method == "fit":
            assert isinstance(message, FitRes) and message.cid == cid
            _assert_weights_only(message.state, reference)
            outputs = message.pool_outputs
            assert (outputs is not None) is (cfg.privacy.transfer == "predictions")
            if outputs is not None:  # the teacher stayed home: rows of PUBLIC images only
                assert message.state == {}
                assert pool_size() not in private
                shapes = set(reference.values())
                for name, tensor in outputs.tensors().items():
                    assert tensor.shape[0] == pool_size(), (name, tensor.shape)
                    assert tensor.shape not in shapes, (name, tensor.shape)
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
                                      "pool_scores", "pool_outputs", "arch"}


def _mlflow_runs(out: Path) -> tuple[Any, Any, list[Any]]:
    """The run folder's MLflow store read by MLflow's own client: (client, the parent run,
    its nested runs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
              == parents[0].info.run_id]
    assert len(nested) == len(runs) - 1
    return client, parents[0], nested


def test_the_run_is_tracked_in_mlflow(quickstart: tuple[Path, Any, PrivacyAudit]) -> None:
    out, result, _ = quickstart
    client, parent, nested = _mlflow_runs(out)
    assert parent.info.run_name == "quickstart" and parent.info.status == "FINISHED"
    assert parent.data.params["strategy.name"] == "universal"
    assert parent.data.params["distill.temperature"] == "4.0"
    assert json.loads(parent.data.params["data.domains"]) == list(result.summary["domains"])
    main_auc = result.summary["methods"]["universal"]["breast"]["auc"]["mean"]
    assert parent.data.metrics["test_auc/breast"] == pytest.approx(main_auc)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "summary.json", "config.yaml", "auc_by_method.png"} <= artifacts
    by_name = {r.info.run_name: r for r in nested}
    # main, four baselines, 3 modes x 3 encoders, LODO's 3 modes x 2 encoders
    assert len(nested) == 1 + 4 + 9 + 6 and all(r.info.status == "FINISHED" for r in nested)
    assert {"main", "baseline-fedavg-seed0", "baseline-centralised-seed0", "universal+ft",
            "mim+knn", "merged+lp"} <= set(by_name)
    # every round's validation AUC per domain, step = the round, as in the run's history
    for run_name, folder in (("main", out), ("baseline-fedavg-seed0",
                                             out / "baselines" / "fedavg-seed0")):
        rows = [r for r in pq.read_table(folder / "history.parquet").to_pylist()
                if r["phase"] == "val" and r["metric"] == "auc"]
        domain = max({r["domain"] for r in rows},  # the domain validated in most rounds
                     key=lambda d: sum(r["domain"] == d for r in rows))
        val = {r["round"]: r["value"] for r in rows if r["domain"] == domain}
        logged = client.get_metric_history(by_name[run_name].info.run_id, f"val_auc/{domain}")
        assert {m.step: m.value for m in logged} == pytest.approx(val), run_name
        assert len(logged) == len(val) >= 2, run_name  # one value per round, none twice
    assert by_name["baseline-fedavg-seed0"].data.params["strategy.name"] == "fedavg"
    ft = by_name["universal+ft"].data.metrics
    assert ft["test_auc/breast"] == pytest.approx(
        result.summary["methods"]["universal+ft"]["breast"]["auc"]["mean"])


def test_a_finished_run_resumes_without_redoing_work(
        quickstart: tuple[Path, Any, PrivacyAudit]) -> None:
    out, result, _ = quickstart
    before = (out / "results.parquet").read_bytes()
    tracked = json.loads((out / "tracking.json").read_text())
    again = resume(out, quiet=True)
    assert (out / "results.parquet").read_bytes() == before
    assert again.summary["methods"] == result.summary["methods"]
    # the resumed study continued its MLflow run: no second parent, no value logged twice
    client, parent, nested = _mlflow_runs(out)
    assert parent.info.run_id == tracked["parent_run_id"] and parent.info.status == "FINISHED"
    assert len(nested) == len(tracked["nested"])
    assert len(client.get_metric_history(parent.info.run_id, "test_auc/breast")) == 1


def test_the_exported_global_model_predicts_as_the_run(
        quickstart: tuple[Path, Any, PrivacyAudit], tmp_path: Path, data_root: Path,
        shard_cache: Path) -> None:
    out, _, _ = quickstart
    # every domain's test AUC / accuracy as the run's history has them, probabilities as
    # the run's clients compute them (a grey and an RGB domain), and `umim predict`
    check_export(out, tmp_path, data_root, shard_cache, client_domains=("breast", "retina"))
    local = sorted((out / "baselines").glob("local-seed*"))[0]
    check_refused(local, tmp_path, data_root, shard_cache)
