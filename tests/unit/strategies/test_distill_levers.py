"""The function-matching levers of distillation (``distill.augment``, ``distill.mixup_alpha``):
off by default, validated, and the switch to per-batch teacher outputs."""

from __future__ import annotations

import dataclasses
import math

import pytest

from strategies.distill import DistillSettings


def test_the_levers_are_off_by_default_and_keep_the_precomputed_path() -> None:
    s = DistillSettings()
    assert s.augment is False and s.mixup_alpha == 0.0
    assert not s.per_batch_targets
    assert s == DistillSettings(augment=False, mixup_alpha=0.0)
    names = [f.name for f in dataclasses.fields(DistillSettings)]
    # appended: positional order unchanged
    assert names[-3:] == ["augment", "mixup_alpha", "mae_weight"]
    assert s.mae_weight == 0.0


@pytest.mark.parametrize(("augment", "alpha", "per_batch"),
                         [(True, 0.0, True), (False, 0.2, True), (True, 1.0, True),
                          (False, 0.0, False)])
def test_either_lever_makes_the_teachers_run_per_batch(augment: bool, alpha: float,
                                                       per_batch: bool) -> None:
    assert DistillSettings(augment=augment, mixup_alpha=alpha).per_batch_targets is per_batch


@pytest.mark.parametrize("alpha", [-0.1, -1.0, math.nan, math.inf])
def test_a_bad_mixup_alpha_is_an_error_naming_the_key(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"distill\.mixup_alpha"):
        DistillSettings(mixup_alpha=alpha)


def test_augment_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"distill\.augment"):
        DistillSettings(augment="yes")  # type: ignore[arg-type]
