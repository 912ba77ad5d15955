"""The placement plan: a pure function of the config (no Ray, no data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.cluster.resources import trial_resources
from engine.config import load_config
from engine.run.plan import client_ids, format_plan, placement_plan

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
SMOKE = REPO / "experiments" / "smoke.yaml"


def test_quickstart_plan() -> None:
    cfg = load_config(QUICKSTART)
    plan = placement_plan(cfg)
    json.dumps(plan)  # plain data
    ids = ["breast", "pneumonia", "retina", "pathology", "adrenal", "vessel", "ct-region",
           "mr-xr", "pooled"]  # centralised is a baseline: the pooled client is started
    assert plan["clients"] == {"count": 9, "ids": ids, "per_domain": 1,
                               "pooled_for": ["centralised"]}
    assert plan["actors"]["count"] == 2
    assert plan["actors"]["clients"] == [ids[0::2], ids[1::2]]
    assert (plan["actors"]["num_cpus"], plan["actors"]["num_gpus"]) == (0.5, 0.0)
    strategy = plan["strategy"]
    assert strategy["name"] == "universal" and strategy["rounds"] == cfg.planned_rounds() == 2
    assert strategy["distils"] and not strategy["pooled"]
    assert strategy["options"]["num_stages"] == 2 and strategy["options"]["local_epochs"] == 3
    assert plan["base"] == "mim"
    jobs = plan["train_jobs"]
    assert jobs["runs"] is True
    assert jobs["pretrain"]["workers"] == 1 and jobs["pretrain"]["epochs"] == 3
    assert jobs["distill"]["for"] == ["main", "lodo-breast"]
    assert jobs["distill"]["cpus"] == 1.0 and jobs["distill"]["gpus"] == 0.0
    assert [s["step"] for s in plan["steps"]] == [
        "main", "baseline-fedavg-seed0", "baseline-fedprox-seed0", "baseline-local-seed0",
        "baseline-centralised-seed0", "eval-finetune", "eval-linear_probe", "eval-knn",
        "lodo-breast"]
    assert {s["client_epochs"] for s in plan["steps"] if "strategy" in s} == {3}
    finetune = plan["steps"][5]
    assert finetune["arms"] == ["universal+ft", "mim+ft", "merged+ft"]
    assert finetune["seeds"] == [0, 1] and plan["steps"][6]["epochs"] == 30
    assert [p["phase"] for p in plan["phases"]] == ["pretrain", "rounds"]
    assert plan["phases"][1]["cpus"] == 2.0
    assert (plan["peak"]["cpus"], plan["peak"]["gpus"]) == trial_resources(cfg) == (2.0, 0.0)


def test_virtual_clients_on_fractional_gpus() -> None:
    cfg = load_config(SMOKE, ["data.clients_per_domain=3", "clients.num_actors=4",
                              "clients.num_gpus=0.25"])
    plan = placement_plan(cfg)
    ids = [f"{d}#{i}" for d in ("breast", "pathology") for i in range(3)]
    assert client_ids(cfg) == plan["clients"]["ids"] == ids
    assert plan["actors"]["count"] == 4
    assert plan["actors"]["clients"] == [ids[a::4] for a in range(4)]
    assert plan["actors"]["clients"][0] == ["breast#0", "pathology#1"]
    assert plan["strategy"]["options"] == {}
    assert plan["train_jobs"] == {"runs": False, "pretrain": None, "distill": None}
    assert plan["base"] == "random-init"
    assert [s["step"] for s in plan["steps"]] == ["main"]
    assert [p["phase"] for p in plan["phases"]] == ["rounds"]
    assert plan["peak"] == {"cpus": 4.0, "gpus": 1.0}


def test_actor_count_defaults_to_one_per_client_and_is_capped() -> None:
    one_each = placement_plan(load_config(SMOKE, ["clients.num_actors=null"]))
    assert one_each["actors"]["count"] == 2
    capped = placement_plan(load_config(SMOKE, ["clients.num_actors=16"]))
    assert capped["actors"]["count"] == 2
    assert capped["actors"]["clients"] == [["breast"], ["pathology"]]


def test_baselines_seeds_and_distilling_baseline() -> None:
    cfg = load_config(SMOKE, ["evaluation.baselines=[universal, fedprox]",
                              "evaluation.baseline_seeds=[3, 4]",
                              "evaluation.baseline_rounds=5",
                              "evaluation.equal_budgets=false",
                              "evaluation.baseline_options={universal: {num_stages: 1, "
                              "rounds_per_stage: 2}}",
                              "evaluation.finetune_epochs=0"])
    plan = placement_plan(cfg)
    steps = {s["step"]: s for s in plan["steps"]}
    assert list(steps) == ["main", "baseline-universal-seed3", "baseline-universal-seed4",
                           "baseline-fedprox-seed3", "baseline-fedprox-seed4"]
    assert steps["baseline-universal-seed3"]["rounds"] == 2  # as universal plans them
    assert steps["baseline-fedprox-seed4"]["rounds"] == 5
    assert steps["baseline-fedprox-seed4"]["options"] == {"proximal_mu": 0.01}
    assert plan["train_jobs"]["runs"] is True and plan["train_jobs"]["pretrain"] is None
    assert plan["train_jobs"]["distill"]["for"] == ["baseline-universal-seed3",
                                                    "baseline-universal-seed4"]
    assert plan["clients"]["pooled_for"] == []


def test_distill_scaling_on_gpus() -> None:
    cfg = load_config(QUICKSTART, ["distill.num_workers=2", "distill.use_gpu=true",
                                   "distill.gpus_per_worker=0.5", "clients.num_gpus=0.25",
                                   "pretrain.method=none"])
    plan = placement_plan(cfg)
    distill = plan["train_jobs"]["distill"]
    assert (distill["workers"], distill["gpus_per_worker"], distill["gpus"]) == (2, 0.5, 1.0)
    assert plan["peak"] == {"cpus": 3.0, "gpus": 1.5}
    assert plan["base"] == "random-init"
    assert plan["steps"][5]["arms"] == ["universal+ft", "random-init+ft", "merged+ft"]


def test_format_plan() -> None:
    text = format_plan(placement_plan(load_config(QUICKSTART, ["strategy.rounds=7"])))
    assert "placement plan of 'quickstart'" in text
    assert "clients      9: breast, pneumonia" in text and "pooled" in text
    assert "holding every domain, for centralised" in text
    assert "2 x (0.5 CPU, 0 GPU); client i on actor i % 2" in text
    assert "actor 0      5 client(s): breast, retina, adrenal, ct-region, pooled" in text
    assert "universal, 2 round(s) as it plans them (strategy.rounds=7); distils" in text
    assert "num_stages=2" in text and "select_on_val=true" in text
    assert "distill    1 worker(s) x (1 CPU, 0 GPU) = 1 CPU, 0 GPU; for main, lodo-breast" \
        in text
    assert "9. lodo-breast: distil without breast" in text
    assert "6. eval-finetune: universal+ft, mim+ft, merged+ft; 3 epoch(s), seeds [0, 1]" in text
    assert "peak         2 CPU, 0 GPU" in text


def test_format_plan_of_many_virtual_clients_stays_short() -> None:
    cfg = load_config(SMOKE, ["data.clients_per_domain=500", "clients.num_actors=40"])
    plan = placement_plan(cfg)
    assert plan["clients"]["count"] == 1000 and plan["actors"]["count"] == 40
    assert len(plan["actors"]["clients"][0]) == 25
    text = format_plan(plan)
    assert "(+988 more)" in text and "24 more actor(s)" in text
    assert len(text.splitlines()) < 40


def test_plan_imports_no_ray() -> None:
    code = ("import sys; from engine.config import load_config; "
            "from engine.run.plan import placement_plan, format_plan; "
            f"format_plan(placement_plan(load_config({str(QUICKSTART)!r}))); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_the_privacy_experiment_plans_its_audit_last() -> None:
    cfg = load_config(REPO / "experiments" / "privacy.yaml")
    assert cfg.evaluation.privacy_audit and not load_config(QUICKSTART).evaluation.privacy_audit
    steps = placement_plan(cfg)["steps"]
    assert [s["step"] for s in steps] == ["main", "baseline-fedavg-seed0", "audit"]
    assert steps[-1]["artefacts"] == ["teacher", "universal", "fedavg"]
    assert "3. audit: loss threshold membership inference on teacher, universal, fedavg" \
        in format_plan(placement_plan(cfg))
    two = placement_plan(load_config(REPO / "experiments" / "privacy.yaml",
                                     ["evaluation.replicates=2"]))["steps"]
    assert [s["step"] for s in two][-1] == "r1-audit"
