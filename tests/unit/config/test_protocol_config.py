"""The study protocol's config: equal budgets by construction, LODO out of domain, the
pre-registered primary comparison, and the evaluation arms and modes, all checked at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[3]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def test_baselines_get_the_main_runs_client_epoch_budget() -> None:
    cfg = load_config(QUICKSTART)
    assert cfg.budget() == 3  # one round per stage x 3 local epochs
    assert {name: cfg.baseline_rounds(name) for name in cfg.evaluation.baselines} == {
        "fedavg": 3, "fedprox": 3, "local": 3, "centralised": 3}
    assert set(cfg.budgets().values()) == {3}
    two = load_config(QUICKSTART, ["train.local_epochs=3"])
    assert two.baseline_rounds("fedavg") == 1 and set(two.budgets().values()) == {3}


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.local_epochs=2"], r"no whole number of rounds gives 'fedavg' the main run's "
                               r"budget of 3 client epochs \(2 per round\)"),
    (["evaluation.baseline_rounds=2"], r"gives baseline 'fedavg' 2 client epochs, the main "
                                       r"run \(universal\) 3: budgets must be equal"),
    (["evaluation.baselines=[universal]",
      "evaluation.baseline_options={universal: {rounds_per_stage: 2}}"],
     r"'universal' plans its own rounds and trains 2 client epochs"),
    (["evaluation.lodo_domains=[ct-region]"], r"\['ct-region'\] take their images from MedNIST, "
                                              r"as does the server's unlabelled pool"),
    (["data.pool_share=0.1"], r"with data.pool_share=0.1 every client domain gives images "
                              r"to the server's unlabelled pool"),
    (["evaluation.encoders=[main, teacher]"], r"evaluation.encoders: unknown \['teacher'\]"),
    (["evaluation.encoders=[main, fedavg]", "evaluation.baselines=[local]"],
     r"evaluation.encoders: unknown \['fedavg'\]"),
    (["evaluation.modes=[probe]"], r"evaluation.modes: unknown \['probe'\]"),
    (["evaluation.label_fractions=[0, 1.0]"], r"label_fractions must be in \(0, 1\]"),
    (["evaluation.primary={a: main, b: random}"], r"evaluation.primary.b='random' is not in "
                                                  r"evaluation.encoders"),
    (["evaluation.primary={a: main, b: main}"], "compares an encoder with itself"),
    (["evaluation.primary={a: main, b: base, mode: knn}", "evaluation.modes=[finetune]"],
     r"evaluation.primary.mode='knn' is not in evaluation.modes"),
    (["evaluation.primary={a: main, b: base, label_fraction: 0.1}"],
     r"label_fraction=0.1 is not in evaluation.label_fractions"),
    (["evaluation.primary={a: main, b: base, unit: pairs}"], r"evaluation.primary.unit"),
    (["evaluation.replicates=0"], r"evaluation.replicates must be > 0"),
    (["evaluation.replicates=2", "evaluation.baseline_seeds=[0, 1]"],
     "drop baseline_seeds"),
])
def test_protocol_mistakes_are_refused_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, overrides)


def test_unequal_budgets_on_purpose_and_baseline_encoders() -> None:
    cfg = load_config(QUICKSTART, ["evaluation.baseline_rounds=2",
                                   "evaluation.equal_budgets=false"])
    assert cfg.budgets()["fedavg"] == 2 and cfg.budgets()["universal"] == 3
    judged = load_config(QUICKSTART, ["evaluation.encoders=[main, base, fedprox]"])
    assert judged.evaluation.encoders == ("main", "base", "fedprox")
