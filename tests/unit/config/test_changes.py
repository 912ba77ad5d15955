"""What a resume may change in a run's config (pure: no Ray)."""

from __future__ import annotations

from engine.config import load_config, to_dict
from engine.config.changes import classify_changes, config_changes, describe_refusal


def _changes(*overrides: str) -> dict:
    return config_changes(to_dict(load_config(None)), to_dict(load_config(None, overrides)))


def test_state_changes_are_refused_naming_the_key() -> None:
    changes = _changes("model.hidden_size=96", "seed=3")
    allowed, refused = classify_changes(changes, ["main"])
    assert allowed == {} and set(refused) == {"model.hidden_size", "seed"}
    line = describe_refusal(refused, changes)
    assert "model.hidden_size (192 -> 96" in line and "\n" not in line


def test_placement_and_extensions_are_allowed() -> None:
    changes = _changes("clients.num_actors=4", "run.checkpoint_every=2",
                       "distill.num_workers=2", "data.data_root=/elsewhere",
                       "evaluation.baselines=[fedavg]", "evaluation.privacy_audit=true")
    allowed, refused = classify_changes(changes, ["main"])
    assert refused == {} and set(allowed) == set(changes)


def test_rounds_grow_only_while_nothing_after_main_is_done() -> None:
    more = _changes("strategy.rounds=5")
    assert classify_changes(more, ["main"])[1] == {}
    assert "steps after the main run" in classify_changes(
        more, ["main", "baseline-local-seed0"])[1]["strategy.rounds"]
    assert classify_changes(_changes("strategy.rounds=1"), [])[1] == {
        "strategy.rounds": "rounds may only grow"}


def test_lists_may_only_be_appended() -> None:
    before = to_dict(load_config(None, ["evaluation.baselines=[fedavg,local]"]))
    after = to_dict(load_config(None, ["evaluation.baselines=[local,fedavg]"]))
    assert classify_changes(config_changes(before, after), [])[1] == {
        "evaluation.baselines": "items may only be appended"}
