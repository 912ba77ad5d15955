from __future__ import annotations

import pytest
import torch

from strategies import FitRes, create_strategy
from strategies.types import POOLED_CID, ClientInfo


def _info(cid: str, domain: str, n: int) -> ClientInfo:
    return ClientInfo(cid=cid, domains=(domain,), tasks={domain: "binary"},
                      num_classes={domain: 2}, num_train=n)


CLIENTS = [_info("a", "da", 100), _info("b", "db", 300)]
ENCODER = {"encoder.w": torch.zeros(2)}


def _res(cid: str, domain: str, value: float, n: int) -> FitRes:
    return FitRes(cid=cid, state={"encoder.w": torch.full((2,), value),
                                  f"heads.{domain}.weight": torch.full((2, 2), value)},
                  num_examples=n)


def test_fedavg_averages_encoder_and_keeps_heads_local() -> None:
    s = create_strategy("fedavg", {})
    s.initialize(CLIENTS, ENCODER)
    ins = s.configure_fit(1, ["a", "b"])
    assert ins["a"].fresh_heads == ("da",) and set(ins["a"].state) == {"encoder.w"}
    assert ins["a"].state["encoder.w"] is ins["b"].state["encoder.w"]  # shipped once
    s.aggregate_fit(1, {"a": _res("a", "da", 1.0, 100), "b": _res("b", "db", 5.0, 300)}, {})
    torch.testing.assert_close(s.encoder["encoder.w"], torch.full((2,), 4.0))  # (100+1500)/400
    ins = s.configure_fit(2, ["a", "b"])
    assert ins["a"].fresh_heads == ()
    torch.testing.assert_close(ins["b"].state["heads.db.weight"], torch.full((2, 2), 5.0))
    assert "heads.da.weight" not in ins["b"].state  # no client sees another's head
    ev = s.configure_evaluate(2, ["a"], "test")
    assert ev["a"].split == "test" and "heads.da.weight" in ev["a"].state


def test_fedavg_ignores_failed_clients_and_restores_from_state_dict() -> None:
    s = create_strategy("fedavg", {})
    s.initialize(CLIENTS, ENCODER)
    metrics = s.aggregate_fit(1, {"b": _res("b", "db", 2.0, 300)}, {"a": "actor died"})
    assert metrics["clients_failed"] == 1.0
    torch.testing.assert_close(s.encoder["encoder.w"], torch.full((2,), 2.0))
    other = create_strategy("fedavg", {})
    other.initialize(CLIENTS, ENCODER)
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.client_state("b")["heads.db.weight"], s.heads["db"]["heads.db.weight"])
    with pytest.raises(ValueError, match="no client result"):
        s.aggregate_fit(2, {}, {"a": "x", "b": "y"})


def test_fedavg_averages_a_head_among_its_domains_clients() -> None:
    clients = [_info("p#0", "p", 100), _info("p#1", "p", 300), _info("q", "q", 50)]
    s = create_strategy("fedavg", {})
    s.initialize(clients, ENCODER)
    s.aggregate_fit(1, {"p#0": _res("p#0", "p", 1.0, 100), "p#1": _res("p#1", "p", 5.0, 300),
                        "q": _res("q", "q", 9.0, 50)}, {})
    # encoder over all three: (100 + 1500 + 450) / 450; head p over its two clients only
    torch.testing.assert_close(s.encoder["encoder.w"], torch.full((2,), 2050 / 450))
    torch.testing.assert_close(s.client_state("p#1")["heads.p.weight"], torch.full((2, 2), 4.0))
    torch.testing.assert_close(s.client_state("q")["heads.q.weight"], torch.full((2, 2), 9.0))
    assert "heads.q.weight" not in s.client_state("p#0")


def test_fedprox_sends_mu() -> None:
    s = create_strategy("fedprox", {"proximal_mu": 0.1})
    s.initialize(CLIENTS, ENCODER)
    assert s.configure_fit(1, ["a"])["a"].config == {"proximal_mu": 0.1}
    assert create_strategy("fedprox").proximal_mu == 0.01  # its Options' default
    with pytest.raises(ValueError, match="rounds"):  # not an option of FedProx
        create_strategy("fedprox", {"proximal_mu": 0.1, "rounds": 3})
    with pytest.raises(ValueError, match="proximal_mu must be >= 0"):
        create_strategy("fedprox", {"proximal_mu": -1.0})


def test_local_only_never_mixes_clients() -> None:
    s = create_strategy("local", {})
    s.initialize(CLIENTS, ENCODER)
    s.aggregate_fit(1, {"a": _res("a", "da", 1.0, 100), "b": _res("b", "db", 5.0, 300)}, {})
    torch.testing.assert_close(s.client_state("a")["encoder.w"], torch.full((2,), 1.0))
    torch.testing.assert_close(s.client_state("b")["encoder.w"], torch.full((2,), 5.0))


def test_centralised_hands_each_client_its_domain_head() -> None:
    pooled = ClientInfo(cid=POOLED_CID, domains=("da", "db"), tasks={"da": "binary",
                        "db": "binary"}, num_classes={"da": 2, "db": 2}, num_train=400)
    s = create_strategy("centralised", {})
    s.initialize([pooled, *CLIENTS], ENCODER)
    assert s.configure_fit(1, [POOLED_CID])[POOLED_CID].fresh_heads == ("da", "db")
    state = {"encoder.w": torch.ones(2), "heads.da.weight": torch.ones(2, 2),
             "heads.db.weight": torch.full((2, 2), 2.0)}
    s.aggregate_fit(1, {POOLED_CID: FitRes(POOLED_CID, state, 400)}, {})
    assert set(s.client_state("b")) == {"encoder.w", "heads.db.weight"}
    with pytest.raises(ValueError, match="pooled client failed"):
        s.aggregate_fit(2, {}, {POOLED_CID: "boom"})


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        create_strategy("fedsgd", {})


def test_strategies_never_import_ray() -> None:
    import subprocess
    import sys

    code = ("import sys, strategies, strategies.registry; "
            "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
