from __future__ import annotations

import pytest
import torch

from strategies.aggregate import nonfinite_keys, weighted_average
from strategies.state import select


def test_weighted_average_matches_hand_computation() -> None:
    a = {"encoder.w": torch.tensor([1.0, 2.0]), "encoder.b": torch.tensor(3.0)}
    b = {"encoder.w": torch.tensor([3.0, 6.0]), "encoder.b": torch.tensor(-1.0)}
    # weights 1 and 3: w = (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0]; b = (3 - 3) / 4 = 0
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["encoder.w"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["encoder.b"], torch.tensor(0.0))
    assert out["encoder.w"].dtype == torch.float32


def test_three_clients_and_key_selection() -> None:
    states = [{"encoder.w": torch.tensor([v]), "heads.x.w": torch.tensor([100.0 * v])}
              for v in (1.0, 2.0, 4.0)]
    out = weighted_average(states, [10, 20, 10], keys=["encoder.w"])
    assert set(out) == {"encoder.w"}
    torch.testing.assert_close(out["encoder.w"], torch.tensor([2.25]))  # (10+40+40)/40


def test_integer_buffers_are_not_averaged() -> None:
    states = [{"bn.num_batches_tracked": torch.tensor(5)},
              {"bn.num_batches_tracked": torch.tensor(9)}]
    assert weighted_average(states, [1, 1])["bn.num_batches_tracked"].item() == 5


@pytest.mark.parametrize("weights", [[0, 0], [-1, 2], [float("nan"), 1], [1]])
def test_bad_weights(weights: list[float]) -> None:
    states = [{"w": torch.zeros(1)}, {"w": torch.ones(1)}]
    with pytest.raises(ValueError):
        weighted_average(states, weights)


def test_nonfinite_keys_and_select() -> None:
    state = {"encoder.a": torch.tensor([1.0, float("nan")]), "encoder.b": torch.ones(2),
             "heads.d.w": torch.tensor([float("inf")]), "steps": torch.tensor(3)}
    assert nonfinite_keys(state) == ["encoder.a", "heads.d.w"]
    assert set(select(state, "encoder.")) == {"encoder.a", "encoder.b"}
