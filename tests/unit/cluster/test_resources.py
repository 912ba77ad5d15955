from __future__ import annotations

import pytest

from engine.cluster.resources import ResourceError, check_capacity, slots_on_node


def test_slots_on_node() -> None:
    node = {"CPU": 16.0, "GPU": 1.0}
    assert slots_on_node(node, 1, 0.125) == 8
    assert slots_on_node(node, 1, 0.4) == 2  # a fraction never spans two GPUs
    assert slots_on_node(node, 4, 0.125) == 4  # CPU-bound
    assert slots_on_node(node, 1, 2) == 0
    assert slots_on_node({"CPU": 8, "GPU": 4}, 1, 2) == 2
    assert slots_on_node({"CPU": 2}, 1, 0) == 2


def test_check_capacity_fails_fast_with_the_knob() -> None:
    nodes = [{"CPU": 2.0}]
    check_capacity(nodes, 2, 1, 0)
    with pytest.raises(ResourceError, match=r"fits only 0.*clients.num_gpus"):
        check_capacity(nodes, 1, 1, 0.5)
    with pytest.raises(ResourceError, match=r"3 client actors .* fits only 2"):
        check_capacity(nodes, 3, 1, 0)
    check_capacity([{"CPU": 2.0}, {"CPU": 16, "GPU": 1}], 8, 1, 0.125)
