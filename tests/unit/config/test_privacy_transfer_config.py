"""``privacy.transfer`` and ``model.domain_arch`` at load: what needs a teacher's weights
(or one encoder family) is refused with a one-line reason naming the key, before anything
starts; the defaults change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from strategies import StrategyContext, create_strategy, resolve_strategy

REPO = Path(__file__).resolve().parents[3]
UNIVERSAL = ["strategy.name=universal", "evaluation.encoders=[main, base]",
             "evaluation.lodo_domains=[]", "evaluation.baselines=[]"]


def test_defaults_are_weights_and_one_family() -> None:
    cfg = load_config(None)
    assert cfg.privacy.transfer == "weights" and dict(cfg.model.domain_arch) == {}
    assert cfg.model.own_arch(["breast"]) is None and cfg.model.for_arch(None) is cfg.model
    quick = load_config(REPO / "experiments" / "quickstart.yaml")
    assert quick.privacy.transfer == "weights"  # its merged arm and LODO load as before


def test_predictions_loads_for_the_universal_strategy() -> None:
    cfg = load_config(None, [*UNIVERSAL, "privacy.transfer=predictions",
                             "strategy.relevance=true"])
    assert cfg.privacy.transfer == "predictions"


@pytest.mark.parametrize("overrides, message", [
    (["privacy.transfer=grads"], r"privacy.transfer"),
    (["strategy.name=fedavg"], r"strategy: strategy 'fedavg' needs the clients' weights"),
    (["evaluation.baselines=[fedavg]"], r"evaluation.baselines: strategy 'fedavg' needs"),
    (["distill.augment=true"], r"distill.augment / distill.mixup_alpha need the teachers"),
    (["distill.mixup_alpha=0.2"], r"distill.augment / distill.mixup_alpha"),
    (["strategy.student_init=merged"], r"strategy.student_init=merged averages the teachers'"),
    (["evaluation.encoders=[main, merged]"], r"evaluation.encoders: 'merged' averages"),
    (["evaluation.lodo_domains=[pathology]"], r"evaluation.lodo_domains distils teachers"),
])
def test_predictions_refuses_what_needs_weights(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*UNIVERSAL, "privacy.transfer=predictions", *overrides])
    if overrides != ["privacy.transfer=grads"]:  # the same settings load under weights
        load_config(None, [*UNIVERSAL, *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model.domain_arch={breast: vgg}"], r"model.domain_arch.breast: unknown encoder 'vgg'"),
    (["model.domain_arch={lungs: resnet18}"], r"model.domain_arch names domains that are "
                                               r"not in data.domains: \['lungs'\]"),
    (["model.domain_arch={breast: resnet18}", "strategy.name=fedavg"],
     r"strategy 'fedavg' trains one encoder family at every client"),
    (["model.domain_arch={breast: resnet18}", "strategy.student_init=merged"],
     r"strategy.student_init=merged averages the teachers' encoders"),
    (["model.domain_arch={breast: resnet18}", "strategy.rounds_per_stage=2"],
     r"strategy.rounds_per_stage > 1 with model.domain_arch"),
])
def test_domain_arch_is_checked_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*UNIVERSAL, *overrides])


def test_domain_arch_names_each_clients_family() -> None:
    cfg = load_config(None, [*UNIVERSAL, "model.domain_arch={breast: resnet18, retina: vit}"])
    model = cfg.model
    assert model.own_arch(["breast"]) == "resnet18"
    assert model.own_arch(["retina"]) is None  # the global family: nothing foreign
    assert model.own_arch(["breast", "retina"]) is None  # a pooled client: the global one
    assert model.for_arch("resnet18").arch == "resnet18"
    assert dict(model.for_arch("resnet18").domain_arch) == {}
    # the same family everywhere loads for any strategy (nothing is heterogeneous)
    load_config(None, ["strategy.name=fedavg", "model.domain_arch={breast: vit}"])


def test_strategies_declare_what_they_support() -> None:
    assert resolve_strategy("universal").predicts and resolve_strategy("universal").heterogeneous
    for name in ("fedavg", "fedprox", "local", "centralised"):
        cls = resolve_strategy(name)
        assert not cls.predicts and not cls.heterogeneous
        assert cls.describe()["declares"]["predicts"] is False
        with pytest.raises(ValueError, match=f"strategy '{name}' needs the clients' weights"):
            create_strategy(name, {}, StrategyContext(transfer="predictions"))
    with pytest.raises(ValueError, match="student_init=merged"):
        create_strategy("universal", {"student_init": "merged"},
                        StrategyContext(transfer="predictions"))
