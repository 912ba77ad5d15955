"""Client sampling (strategy.fraction_fit / min_fit_clients and the evaluate twins): the
pure seeded draw, its config keys, and the round loop training only the sampled clients,
the same ones after a resume, with failures among them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import ConfigError, load_config, to_dict
from engine.fl.failures import ClientFailure
from engine.fl.simulation import RunError, Simulation
from engine.records.checkpoint import latest_checkpoint
from engine.records.storage import Storage
from strategies.sampling import ClientSampling, sample_clients, sample_size
from strategies.types import ClientInfo, EvaluateRes, FitRes

CIDS = [f"pneumonia#{i}" for i in range(40)]


def test_sample_size_follows_fraction_and_minimum() -> None:
    assert sample_size(40, 0.1) == 4
    assert sample_size(40, 0.11) == 5      # ceil
    assert sample_size(40, 0.01) == 1      # never zero
    assert sample_size(40, 0.1, 10) == 10  # the minimum wins
    assert sample_size(40, 0.1, 100) == 40  # at most every client
    assert sample_size(40, 1.0) == 40
    assert sample_size(0, 0.5) == 0


def test_the_draw_is_seeded_by_seed_round_and_phase_not_by_order() -> None:
    draw = sample_clients(CIDS, 0.1, seed=3, server_round=2)
    assert len(draw) == 4 and draw == sorted(draw) and set(draw) <= set(CIDS)
    assert sample_clients(list(reversed(CIDS)), 0.1, seed=3, server_round=2) == draw
    assert sample_clients(CIDS, 0.1, seed=3, server_round=2) == draw
    others = [sample_clients(CIDS, 0.1, seed=3, server_round=r) for r in range(3, 8)]
    assert any(o != draw for o in others)
    assert sample_clients(CIDS, 0.1, seed=4, server_round=2) != draw or \
        sample_clients(CIDS, 0.1, seed=5, server_round=2) != draw
    assert sample_clients(CIDS, 0.1, seed=3, server_round=2, phase="evaluate") != draw or \
        sample_clients(CIDS, 0.1, seed=3, server_round=3, phase="evaluate") != others[0]
    assert sample_clients(CIDS, 1.0, seed=3, server_round=2) == sorted(CIDS)


def test_over_many_rounds_every_client_is_drawn_about_equally() -> None:
    counts = dict.fromkeys(CIDS, 0)
    for r in range(1, 401):
        for cid in sample_clients(CIDS, 0.1, seed=0, server_round=r):
            counts[cid] += 1
    assert sum(counts.values()) == 1600
    assert min(counts.values()) > 20 and max(counts.values()) < 60  # mean 40


@pytest.mark.parametrize(("override", "message"), [
    ("strategy.fraction_fit=0", "strategy.fraction_fit must be in (0, 1]"),
    ("strategy.fraction_evaluate=1.5", "strategy.fraction_evaluate must be in (0, 1]"),
    ("strategy.min_fit_clients=-1", "strategy.min_fit_clients must be >= 0"),
    ("strategy.min_fit_clients=41", "exceeds the federation's 40 clients"),
    ("strategy.fraction_fit=yes", "strategy.fraction_fit: expected a number"),
])
def test_bad_sampling_keys_fail_at_load(override: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(")
                       .replace(")", r"\)")):
        load_config(None, ["data.domains=[pneumonia]", "data.clients_per_domain=40",
                           override])


def test_sampling_with_equal_budgets_in_a_study_is_refused() -> None:
    with pytest.raises((ConfigError, ValueError), match="cannot give every arm"):
        load_config(None, ["data.domains=[pneumonia]", "data.clients_per_domain=40",
                           "strategy.fraction_fit=0.1", "evaluation.baselines=[local]"])


def test_sampling_keys_round_trip_and_carry_to_baselines() -> None:
    cfg = load_config(None, ["data.domains=[pneumonia]", "data.clients_per_domain=40",
                             "strategy.fraction_fit=0.25", "strategy.min_fit_clients=3"])
    assert to_dict(cfg)["strategy"]["fraction_fit"] == 0.25
    assert cfg.strategy.sampling() == ClientSampling(fraction_fit=0.25, min_fit_clients=3)
    assert cfg.strategy.with_strategy("fedprox").sampling() == cfg.strategy.sampling()
    default = load_config(None, ["data.domains=[pneumonia]"])
    assert not default.strategy.sampling().samples_fit


class ManyClients:
    """40 clients of one domain; a fit returns weights = 1, records who trained; client
    ``fail`` raises in every round it is sampled."""

    def __init__(self, fail: str | None = None) -> None:
        self._infos = {c: ClientInfo(cid=c, domains=("pneumonia",),
                                     tasks={"pneumonia": "binary"},
                                     num_classes={"pneumonia": 2}, num_train=10)
                       for c in CIDS}
        self.fail = fail
        self.trained: dict[int, list[str]] = {}
        self.scored: dict[int, list[str]] = {}

    def infos(self) -> dict[str, ClientInfo]:
        return dict(self._infos)

    def run(self, method: str, instructions: Mapping[str, Any], on_done: Any = None,
            on_submitted: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        out: dict[str, Any] = {}
        failures: dict[str, Any] = {}
        if method == "evaluate":
            self.scored[len(self.scored) + 1] = sorted(instructions)
        for cid, ins in instructions.items():
            if method == "fit":
                self.trained.setdefault(int(ins.config["round"]), []).append(cid)
                if cid == self.fail:
                    failures[cid] = ClientFailure("task_error", "boom")
                    continue
                out[cid] = FitRes(cid, {"encoder.w": torch.ones(()),
                                        "heads.pneumonia.weight": torch.zeros(2, 1)}, 10)
            else:
                out[cid] = EvaluateRes(cid, ins.split, {"pneumonia": {"auc": 0.5, "acc": 0.5}},
                                       5)
        return out, failures


def _cfg(*extra: str) -> Any:
    return load_config(None, ["data.domains=[pneumonia]", "data.clients_per_domain=40",
                              "strategy.name=fedavg", "strategy.rounds=4",
                              "strategy.fraction_fit=0.1", "strategy.fraction_evaluate=0.25",
                              "run.checkpoint_every=2", *extra])


def test_the_round_loop_trains_exactly_the_sampled_clients(tmp_path: Path) -> None:
    cfg = _cfg()
    pool = ManyClients()
    sim = Simulation(cfg, Storage(tmp_path / "run"), pool, {"encoder.w": torch.zeros(())},
                     quiet=True)
    sim.run()
    sampling = cfg.strategy.sampling()
    for r in range(1, 5):
        assert sorted(pool.trained[r]) == sampling.fit(CIDS, seed=cfg.seed, server_round=r)
    assert len({tuple(v) for v in pool.trained.values()}) > 1  # rounds differ
    # per-round val scores a quarter of the clients; the final test scores all 40
    sizes = sorted(len(v) for v in pool.scored.values())
    assert sizes[-1] == 40 and all(s == 10 for s in sizes[:-1])
    sampled = [r.value for r in sim.history.records if r.metric == "clients_sampled"]
    assert sampled == [4.0] * 4


def test_a_resumed_run_samples_the_same_clients(tmp_path: Path) -> None:
    cfg = _cfg()
    whole = ManyClients()
    Simulation(cfg, Storage(tmp_path / "whole"), whole, {"encoder.w": torch.zeros(())},
               quiet=True).run()
    first = ManyClients()
    part = Simulation(_cfg("strategy.rounds=2"), Storage(tmp_path / "part"), first,
                      {"encoder.w": torch.zeros(())}, quiet=True)
    part.run()
    second = ManyClients()
    resumed = Simulation(cfg, Storage(tmp_path / "part"), second,
                         {"encoder.w": torch.zeros(())}, quiet=True)
    start = resumed.restore(latest_checkpoint(Storage(tmp_path / "part")))
    assert start == 3
    resumed.run(start)
    assert {**first.trained, **second.trained} == whole.trained


def test_a_failed_sampled_client_counts_against_min_fit_fraction(tmp_path: Path) -> None:
    cfg = _cfg()
    victim = cfg.strategy.sampling().fit(CIDS, seed=cfg.seed, server_round=1)[0]
    pool = ManyClients(fail=victim)
    sim = Simulation(_cfg("clients.min_fit_fraction=0.75"), Storage(tmp_path / "ok"), pool,
                     {"encoder.w": torch.zeros(())}, quiet=True)
    sim.run()  # 3 of 4 valid: enough
    assert any(f["client"] == victim for f in sim.failures)
    strict = Simulation(cfg, Storage(tmp_path / "strict"), ManyClients(fail=victim),
                        {"encoder.w": torch.zeros(())}, quiet=True)
    with pytest.raises(RunError, match="only 3 of 4 clients"):
        strict.run()
