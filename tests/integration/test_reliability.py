"""No lost or wrong results from plain user actions: two runs into one folder, a resume
after the main step finished, an edited config on resume, a hung client."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from engine.config import ExperimentConfig, load_config
from engine.fl.simulation import RunError
from engine.records.lock import RunLock, RunLockError
from engine.records.storage import Storage
from engine.run.study import _new_storage, resume, run
from strategies import register_strategy
from strategies.fedavg import FedAvg

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]


def _smoke(shard_cache: Path, *overrides: str) -> ExperimentConfig:
    return load_config(REPO / "experiments" / "smoke.yaml",
                       [f"data.cache_dir={shard_cache}", *overrides])


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path: Path, data_root: Path,
                                                          shard_cache: Path) -> None:
    out = tmp_path / "run"
    with RunLock(Storage(out)):  # another process's run, mid-start
        started = time.monotonic()
        with pytest.raises(RunLockError, match=r"in use by PID \d+"):
            run(_smoke(shard_cache), out=out, data_root=str(data_root), quiet=True)
        assert time.monotonic() - started < 5
    assert sorted(p.name for p in out.iterdir()) == []  # the loser wrote nothing
    names = {_new_storage(_smoke(shard_cache, f"seed={s}"), None).uri for s in (0, 1, 1)}
    assert len(names) == 3  # runs started in the same second never share a folder


def test_resume_after_the_main_step_keeps_its_results(tmp_path: Path, data_root: Path,
                                                      shard_cache: Path) -> None:
    out = tmp_path / "r"
    first = run(_smoke(shard_cache, "evaluation.baselines=[local]"), out=out,
                data_root=str(data_root), quiet=True)
    (out / "progress" / "baseline-local-seed0.done").unlink()  # a later step "failed"
    again = resume(out, data_root=str(data_root), quiet=True)
    for domain, row in first.summary["domains"].items():
        assert not math.isnan(again.summary["domains"][domain]["auc"])
        assert again.summary["domains"][domain] == row
    assert again.summary["mean_test_auc"] == first.summary["mean_test_auc"]


def test_resume_refuses_an_edited_model_and_extends_rounds(tmp_path: Path, data_root: Path,
                                                           shard_cache: Path) -> None:
    out = tmp_path / "e"
    run(_smoke(shard_cache), out=out, data_root=str(data_root), quiet=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    edited = {**saved, "model": {**saved["model"], "hidden_size": 64}}
    (out / "config.yaml").write_text(yaml.safe_dump(edited))
    started = time.monotonic()
    with pytest.raises(RunError, match=r"model\.hidden_size \(32 -> 64"):
        resume(out, data_root=str(data_root), quiet=True)
    assert time.monotonic() - started < 5  # refused before anything starts
    longer = {**saved, "strategy": {**saved["strategy"], "rounds": 3}}
    (out / "config.yaml").write_text(yaml.safe_dump(longer))
    result = resume(out, data_root=str(data_root), quiet=True)
    assert result.summary["rounds"] == 3
    assert {r.round for r in result.history.records if r.phase == "fit"} == {1, 2, 3}
    log = json.loads((out / "progress" / "resumes.json").read_text())
    assert log[-1]["changes"] == {"strategy.rounds": [2, 3]}


@register_strategy
class HangBreast(FedAvg):
    """Test strategy: the breast client trains for ever (a million epochs)."""

    name: ClassVar[str] = "test-hang-breast"

    def fit_config(self, server_round: int, cid: str) -> dict[str, Any]:
        return {"epochs": 10**6} if cid == "breast" else {}


def test_a_hung_client_is_a_failure_not_a_hang(tmp_path: Path, data_root: Path,
                                               shard_cache: Path) -> None:
    cfg = _smoke(shard_cache, "strategy.name=test-hang-breast", "strategy.rounds=1",
                 "clients.task_timeout_s=4", "clients.max_retries=0",
                 "clients.min_fit_fraction=0.5")
    started = time.monotonic()
    result = run(cfg, out=tmp_path / "h", data_root=str(data_root), quiet=True)
    assert time.monotonic() - started < 120
    failures = result.summary["failures"]
    assert [(f["client"], f["kind"]) for f in failures] == [("breast", "timeout")]
    assert "clients.task_timeout_s=4s" in failures[0]["reason"]
