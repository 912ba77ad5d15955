from __future__ import annotations

import math

import pytest
import torch

from strategies.distill import (
    agreement,
    confidence,
    feature_matching,
    kd_per_sample,
    teacher_weights,
    tempered_probs,
)


def test_kd_matches_the_hand_computed_kl() -> None:
    teacher = torch.tensor([[2.0, 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, dim=1)[0]  # teacher at T=2: [e^1, 1] / (e + 1)
    expected = t**2 * float((p * (p.log() - math.log(0.5))).sum())
    got = kd_per_sample(student, tempered_probs(teacher, t, "binary"), t, "binary")
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected, rel=1e-5)
    same = kd_per_sample(teacher, tempered_probs(teacher, t, "binary"), t, "binary")
    assert float(same[0]) == pytest.approx(0.0, abs=1e-6)


def test_multilabel_kd_is_a_per_label_binary_kl() -> None:
    teacher = torch.tensor([[3.0, -3.0]])
    student = torch.zeros(1, 2)
    p = torch.sigmoid(teacher)[0]
    expected = float(((p * (p / 0.5).log() + (1 - p) * ((1 - p) / 0.5).log())).mean())
    got = kd_per_sample(student, tempered_probs(teacher, 1.0, "multi-label"), 1.0,
                        "multi-label")
    assert float(got[0]) == pytest.approx(expected, rel=1e-4)


def test_confidence_and_weights() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    c = confidence(logits, "multi-class")
    assert float(c[0]) == pytest.approx(0.0, abs=1e-6) and float(c[1]) > 0.99
    conf = torch.tensor([[0.9, 0.1], [0.1, 0.1]])  # 2 teachers x 2 samples
    w = teacher_weights(conf, "confidence")
    torch.testing.assert_close(w.sum(dim=0), torch.ones(2))
    assert float(w[0, 0]) == pytest.approx(0.9) and float(w[0, 1]) == pytest.approx(0.5)
    torch.testing.assert_close(teacher_weights(conf, "uniform"), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError):
        teacher_weights(conf, "entropy")  # type: ignore[arg-type]


def test_feature_matching_and_agreement() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert feature_matching(a, a).abs().max() < 1e-6
    assert float(feature_matching(a, -a)[0]) == pytest.approx(2.0)
    s = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert float(agreement(s, t, "binary")) == pytest.approx(2 / 3)
    assert float(agreement(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 1.0]]),
                           "multi-label")) == pytest.approx(0.5)
