"""The doors a researcher uses without forking umim, exercised from outside the package:
an encoder and a strategy named by import path (``umim_demo_plugins``, a module beside this
file, not in the package), and an encoder registered by a call in the driver, as a notebook
would, that must reach the client actors and the Ray Train workers of a distillation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import umim
from engine.config import ConfigError, load_config
from engine.nn.models import ENCODERS
from strategies import LOSS_NAMES

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]
REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "smoke.yaml"
CNN = "umim_demo_plugins:TinyCNN"
DAMPED = "umim_demo_plugins:DampedFedAvg"


def test_options_of_imported_plugins_are_checked_at_load(shard_cache: Path) -> None:
    cfg = load_config(SMOKE, [f"model.arch={CNN}", "model.options={width: 8}",
                              f"strategy.name={DAMPED}", "strategy.keep=0.25"])
    assert cfg.strategy.options.keep == 0.25 and dict(cfg.model.options) == {"width": 8}
    for override, message in [
        ("model.options={depth: 2}", r"unknown config key\(s\) \['model\.options\.depth'\]; "
                                     r"valid keys here: \['width'\]"),
        ("model.options={width: 0}", "width must be >= 1"),
        ("strategy.proximal_mu=0.1", r"not option\(s\) of strategy "
                                     r"'umim_demo_plugins:DampedFedAvg'; its options: \['keep'\]"),
        ("strategy.keep=2", r"strategy\.keep must be in \[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, [f"model.arch={CNN}", f"strategy.name={DAMPED}", override])
    with pytest.raises(ConfigError, match=r"model\.arch: cannot import 'no_such_pkg\.nets'"):
        load_config(SMOKE, ["model.arch=no_such_pkg.nets:Net"])


def test_encoder_and_strategy_by_import_path_run_on_ray(tmp_path: Path, data_root: Path,
                                                         shard_cache: Path) -> None:
    cfg = load_config(SMOKE, [f"data.cache_dir={shard_cache}", f"model.arch={CNN}",
                              "model.options={width: 8}", f"strategy.name={DAMPED}",
                              "strategy.keep=0.25"])
    result = umim.run(cfg, out=tmp_path / "run", data_root=str(data_root), quiet=True)
    encoder = result.strategy_state["encoder"]
    assert encoder["encoder.body.0.weight"].shape == (8, 3, 3, 3)  # the user's network
    server = result.history.to_pandas().query("phase == 'server' and metric == 'kept'")
    assert list(server.value) == [0.25, 0.25]  # the user's strategy aggregated both rounds
    for domain, row in result.summary["domains"].items():
        assert 0.0 <= row["auc"] <= 1.0, domain
    assert result.summary["failures"] == []


def test_a_notebook_registered_encoder_reaches_actors_and_train_workers(
        tmp_path: Path, data_root: Path, shard_cache: Path) -> None:
    class NotebookEncoder(nn.Module):  # defined here, importable nowhere: Ray ships it
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 12))
            self.out_features = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    umim.register_encoder("notebook-mlp", lambda cfg: NotebookEncoder())
    try:
        cfg = load_config(SMOKE, [
            f"data.cache_dir={shard_cache}", "model.arch=notebook-mlp",
            "strategy.name=universal", "strategy.num_stages=1", "strategy.local_epochs=1",
            "clients.num_cpus=0.5", "data.pool_size=300", "distill.steps=6",
            "distill.eval_every=3", "distill.batch_size=32"])
        result = umim.run(cfg, out=tmp_path / "uni", data_root=str(data_root), quiet=True)
    finally:
        ENCODERS.unregister("notebook-mlp")
    state = result.strategy_state
    assert state["encoder"]["encoder.proj.1.weight"].shape == (12, 3 * 28 * 28)
    assert set(state["global_heads"]) == {"heads.breast.weight", "heads.breast.bias",
                                          "heads.pathology.weight", "heads.pathology.bias"}
    curve = state["curves"][1]  # the distillation ran on Ray Train with the notebook's net
    assert curve and set(LOSS_NAMES) <= set(curve[-1])
    assert all(torch.isfinite(torch.tensor([row[n] for n in LOSS_NAMES])).all()
               for row in curve)
