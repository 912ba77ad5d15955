from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig, TrainConfig
from engine.fl.client import Client, ClientSpec
from strategies import EvaluateIns, FitIns, nonfinite_keys

TINY = ModelConfig(hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2)



def _client(spec: ClientSpec, **train: object) -> Client:
    return Client(spec, TINY, TrainConfig(batch_size=32, **train), seed=0, max_train_samples=96,
                  max_eval_samples=48, device="cpu")


def _encoder(client: Client) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in client.model.state_dict().items() if k.startswith("encoder.")}


def test_fit_is_deterministic_per_client_round_and_seed(specs: dict[str, ClientSpec]) -> None:
    a, b = _client(specs["breast"]), _client(specs["breast"])
    enc = _encoder(a)
    ins = lambda r: FitIns(dict(enc), ("breast",), {"round": r, "seed": 7})  # noqa: E731
    ra, rb = a.fit(ins(1)), b.fit(ins(1))
    assert all(torch.equal(ra.state[k], rb.state[k]) for k in ra.state)
    rc = a.fit(ins(2))
    assert not all(torch.equal(ra.state[k], rc.state[k]) for k in ra.state)
    assert ra.num_examples == 96 and set(ra.metrics) == {"train_loss", "train_seconds"}
    assert set(ra.state) == set(a.model.state_dict())


def test_evaluate_returns_only_metrics(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["pathology"])
    res = c.evaluate(EvaluateIns(c._export(), "test"))
    assert res.num_examples == 48 and set(res.metrics) == {"pathology"}
    m = res.metrics["pathology"]
    assert set(m) == {"auc", "acc", "loss"} and 0 <= m["auc"] <= 1 and 0 <= m["acc"] <= 1
    assert all(isinstance(v, float) for v in m.values())


def test_select_on_val_keeps_the_best_epoch(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"], local_epochs=3)
    res = c.fit(FitIns(_encoder(c), ("breast",), {"round": 1, "select_on_val": True}))
    assert 1 <= res.metrics["best_epoch"] <= 3 and "val_selection_score" in res.metrics


def test_diverging_training_gives_a_nonfinite_update(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"], optimizer="sgd")
    res = c.fit(FitIns(_encoder(c), ("breast",), {"round": 1, "lr": 1e30}))
    assert nonfinite_keys(res.state)


def test_proximal_term_keeps_the_encoder_close(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"], lr=1e-2)
    enc = _encoder(c)

    def drift(mu: float) -> float:
        res = c.fit(FitIns(dict(enc), ("breast",), {"round": 1, "proximal_mu": mu}))
        return sum(float((res.state[k] - v).pow(2).sum()) for k, v in enc.items())

    assert drift(100.0) < 0.5 * drift(0.0)


def test_wrong_state_is_refused(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["breast"])
    with pytest.raises(ValueError, match="missing"):
        c.fit(FitIns(_encoder(c), (), {}))  # no head and none to create
    with pytest.raises(ValueError, match="unexpected"):
        c.fit(FitIns({**_encoder(c), "heads.x.weight": torch.zeros(1)}, ("breast",), {}))


def test_pooled_client_trains_every_head(specs: dict[str, ClientSpec]) -> None:
    c = _client(specs["pooled"])
    assert c.info().domains == ("breast", "pathology") and c.info().num_train == 192
    res = c.fit(FitIns(_encoder(c), ("breast", "pathology"), {"round": 1}))
    assert {"heads.breast.weight", "heads.pathology.weight"} <= set(res.state)
    # the pooled client draws the same capped subsets as the single-domain clients
    single = _client(specs["breast"])
    assert torch.equal(single.data["breast"]["train"].x, c.data["breast"]["train"].x)
