"""evaluation.select_round: the round loop reports the best-on-val round's model (the same
rule for every arm), across a checkpoint and resume, or the last round's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.config import load_config
from engine.fl.simulation import Simulation
from engine.records.checkpoint import latest_checkpoint
from engine.records.storage import Storage
from strategies.types import ClientInfo, EvaluateRes, FitRes

VAL_AUC = {1: 0.6, 2: 0.8, 3: 0.7}  # val AUC of the model after each round


class ScriptedPool:
    """Two clients; a fit stamps the round into the weights, an evaluation reads it back
    (val: the scripted AUC of that round's model; test: the round itself, as ``auc``)."""

    def __init__(self) -> None:
        self._infos = {d: ClientInfo(cid=d, domains=(d,), tasks={d: "binary"},
                                     num_classes={d: 2}, num_train=10)
                       for d in ("breast", "pneumonia")}

    def infos(self) -> dict[str, ClientInfo]:
        return dict(self._infos)

    def run(self, method: str, instructions: Mapping[str, Any], on_done: Any = None,
            on_submitted: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        out: dict[str, Any] = {}
        for cid, ins in instructions.items():
            if method == "fit":
                stamp = torch.tensor(float(ins.config["round"]))
                out[cid] = FitRes(cid, {"encoder.w": stamp,
                                        f"heads.{cid}.weight": torch.zeros(2, 1)}, 10)
            else:
                model_round = int(ins.state["encoder.w"])
                auc = VAL_AUC[model_round] if ins.split == "val" else float(model_round)
                out[cid] = EvaluateRes(cid, ins.split, {cid: {"auc": auc, "acc": auc}}, 5)
        return out, {}


def _sim(tmp_path: Path, rule: str) -> Simulation:
    cfg = load_config(None, ["data.domains=[breast,pneumonia]", "strategy.name=fedavg",
                             "strategy.rounds=3", f"evaluation.select_round={rule}"])
    return Simulation(cfg, Storage(tmp_path / rule), ScriptedPool(),
                      {"encoder.w": torch.tensor(0.0)}, quiet=True)


def test_best_val_reports_the_round_with_the_best_val_auc(tmp_path: Path) -> None:
    result = _sim(tmp_path, "best_val").run()
    assert result.summary["selected_round"] == 2
    assert result.summary["mean_test_auc"] == 2.0  # the test split scored round 2's model
    assert result.summary["mean_val_auc"] == 0.8
    assert float(result.strategy_state["encoder"]["encoder.w"]) == 2.0


def test_last_reports_the_last_round(tmp_path: Path) -> None:
    result = _sim(tmp_path, "last").run()
    assert result.summary["selected_round"] == 3 and result.summary["mean_test_auc"] == 3.0


def test_the_best_round_survives_a_checkpoint_and_resume(tmp_path: Path) -> None:
    first = _sim(tmp_path, "best_val")
    first.run()
    checkpoint = latest_checkpoint(first.storage)
    assert checkpoint is not None and checkpoint.extra["best"]["round"] == 2
    again = _sim(tmp_path, "best_val")
    again.restore(checkpoint)
    assert again.select() == 2
    assert float(again.strategy.state_dict()["encoder"]["encoder.w"]) == 2.0


def test_a_tuning_run_scores_val_and_never_touches_test(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.domains=[breast,pneumonia]", "strategy.name=fedavg",
                             "strategy.rounds=3", "evaluation.select_round=best_val",
                             "evaluation.split=val"])
    sim = Simulation(cfg, Storage(tmp_path / "val"), ScriptedPool(),
                     {"encoder.w": torch.tensor(0.0)}, quiet=True)
    result = sim.run()
    phases = {r.phase for r in result.history.records}
    assert "test" not in phases and "final_val" in phases
    assert result.summary["mean_test_auc"] == 0.8  # round 2's model, scored on val
