from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import engine
from engine.cli import build_parser, main
from engine.config import load_config


def test_data_list_json(data_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list", "--json", "--data-root", str(data_root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["breast", "pneumonia", "retina", "pathology", "adrenal", "vessel",
                         "ct-region", "mr-xr"]
    assert (out["breast"]["train"], out["breast"]["val"], out["breast"]["test"]) == (546, 78, 156)
    assert out["vessel"]["test"] == 382 and out["retina"]["task"] == "ordinal"
    assert out["ct-region"]["train"] + out["ct-region"]["val"] + out["ct-region"]["test"] == 15000


def test_data_list_table_and_missing_root(data_root: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "pneumonia" in out and "4708" in out and "29477" in out
    assert main(["data", "list", "--data-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "breastmnist.npz is missing" in out


# -- the rest of the command line (no Ray: the engine's entry points are fakes) ---------------
REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
SMOKE = str(REPO / "experiments" / "smoke.yaml")


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def fake_study(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """``engine.run.study`` replaced by a module whose ``run`` / ``resume`` record their
    arguments (and do ``calls.action(...)`` when set)."""
    calls = SimpleNamespace(run=None, resume=None, action=None, env={})
    summary = {"name": "x", "strategy": "fedavg", "domains": {"breast": {"auc": 0.5,
                                                                          "acc": 0.5}},
               "mean_test_auc": 0.5}

    def run(cfg: Any, *, out: Any = None, data_root: str | None = None,
            cache_dir: str | None = None, quiet: bool = False, callbacks: Any = (),
            config_file: Any = None) -> Any:
        calls.run = {"cfg": cfg, "out": out, "data_root": data_root, "cache_dir": cache_dir,
                     "quiet": quiet, "config_file": config_file}
        if calls.action:
            calls.action(out)
        return SimpleNamespace(run_dir=str(out), summary=summary)

    def resume(run_dir: Any, *, quiet: bool = False, callbacks: Any = ()) -> Any:
        calls.resume = {"run_dir": run_dir, "quiet": quiet}
        calls.env = {"RAY_ADDRESS": os.environ.get("RAY_ADDRESS")}
        if calls.action:
            calls.action(run_dir)
        return SimpleNamespace(run_dir=str(run_dir), summary=summary)

    module = types.ModuleType("engine.run.study")
    module.run, module.resume = run, resume  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.run.study", module)
    calls.module, calls.summary = module, summary
    return calls


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"umim {engine.__version__}\n"


def test_config_show_resolves_and_plans(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    had_ray = "ray" in sys.modules
    assert main(["config", "show", QUICKSTART, "strategy.rounds=5", "--data-root",
                 str(tmp_path / "data"), "--address", "ray://head:10001"]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load(out)  # the plan is YAML comments: the output replays the run
    assert cfg["strategy"]["rounds"] == 5 and cfg["strategy"]["name"] == "universal"
    assert cfg["data"]["data_root"] is None  # machine paths are never saved in a config
    assert f"# data root    {(tmp_path / 'data').resolve()} (this machine" in out
    assert "# cache        " in out
    assert cfg["run"]["address"] == "ray://head:10001"
    assert "# placement plan of 'quickstart'" in out and "#   peak         2 CPU, 0 GPU" in out
    assert load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])
    assert main(["config", "show", SMOKE, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["name"] == "smoke" and doc["plan"]["actors"]["count"] == 2
    assert set(doc["paths"]) == {"data_root", "cache_dir"}
    assert had_ray or "ray" not in sys.modules


def test_run_dry_run_starts_nothing(tmp_path: Path, fake_study: SimpleNamespace,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", SMOKE, "strategy.rounds=3", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["strategy"]["rounds"] == 3
    assert "# placement plan of 'smoke'" in text and "1. main: fedavg, 3 round(s)" in text
    assert f"# run dir      {out} (a dry run" in text
    assert fake_study.run is None and not out.exists()


def test_run_passes_flags(tmp_path: Path, fake_study: SimpleNamespace,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", SMOKE, "--out", str(out), "--data-root", str(tmp_path / "d"),
                 "--cache-dir", str(tmp_path / "c"), "--address", "auto", "--quiet"]) == 0
    call = fake_study.run
    assert call["out"] == str(out) and call["quiet"] is True
    assert call["config_file"] == SMOKE  # recorded in origin.json (the report's sweep link)
    assert call["data_root"] == str(tmp_path / "d") and call["cache_dir"] == str(tmp_path / "c")
    cfg = call["cfg"]
    assert cfg.run.address == "auto"
    assert (cfg.data.data_root, cfg.data.cache_dir) == (None, None)  # not saved in the config
    assert "mean test AUC 0.500" in capsys.readouterr().out


def test_a_validation_run_prints_val_not_test(tmp_path: Path, fake_study: SimpleNamespace,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def scored_on_val(out: Any) -> None:
        fake_study.summary["scored_split"] = "val"

    fake_study.action = scored_on_val
    assert main(["run", SMOKE, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "mean val AUC 0.500" in text and "val metrics" in text
    assert "test AUC" not in text and "test metrics" not in text


@pytest.mark.parametrize(("override", "needle"), [
    ("strategy.bogus=1", "strategy.bogus"),
    ("strategy.name=nope", "unknown strategy 'nope'"),
    ("train.no_such_key=3", "train.no_such_key"),
    ("clients.num_cpus=-1", "clients.num_cpus"),
])
def test_bad_config_is_one_line(tmp_path: Path, override: str, needle: str,
                                fake_study: SimpleNamespace,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", QUICKSTART, override, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("umim: config error:") and needle in line
    assert not out.exists() and fake_study.run is None
    assert main(["config", "show", QUICKSTART, override]) == 2
    assert needle in _one_error_line(capsys.readouterr().err)


def test_missing_config_file_and_directory_as_config(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    assert main(["run", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert main(["config", "show", str(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"umim: error: Is a directory: {tmp_path}"


@pytest.mark.parametrize("command", ["report", "resume"])
def test_report_and_resume_need_a_run_directory(command: str, tmp_path: Path,
                                                fake_study: SimpleNamespace,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert main([command, str(missing)]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        f"umim {command}: error: {missing} does not exist"
    assert not missing.exists()  # resume must not create it
    assert main([command, str(tmp_path)]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        f"umim {command}: error: {tmp_path} holds no config.yaml: not a umim run directory"
    (tmp_path / "file").write_text("")
    assert main([command, str(tmp_path / "file")]) == 2
    assert "is not a directory" in _one_error_line(capsys.readouterr().err)
    assert fake_study.resume is None


def test_resume_flags(tmp_path: Path, fake_study: SimpleNamespace,
                      monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text("name: x\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["resume", str(tmp_path), "--quiet", "--address", "ray://h:1"]) == 0
    assert fake_study.resume == {"run_dir": str(tmp_path), "quiet": True}
    assert fake_study.env["RAY_ADDRESS"] == "ray://h:1"  # the engine reads it when connecting
    assert "RAY_ADDRESS" not in os.environ
    # an engine whose resume does not take --data-root yet says so in one line
    assert main(["resume", str(tmp_path), "--data-root", str(tmp_path)]) == 2
    assert "--data-root is not supported" in _one_error_line(capsys.readouterr().err)
    seen = {}

    def resume(run_dir: Any, *, data_root: str | None = None, cache_dir: str | None = None,
               quiet: bool = False, callbacks: Any = ()) -> Any:
        seen.update(data_root=data_root, cache_dir=cache_dir)
        return SimpleNamespace(run_dir=str(run_dir), summary={
            "name": "x", "strategy": "fedavg", "domains": {}, "mean_test_auc": 0.5})

    monkeypatch.setattr(fake_study.module, "resume", resume)
    assert main(["resume", str(tmp_path), "--data-root", "D", "--cache-dir", "C"]) == 0
    assert seen == {"data_root": "D", "cache_dir": "C"}


def test_unexpected_error_is_one_line_or_a_traceback_with_v(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr("engine.cli._cmd_strategies", boom)
    assert main(["strategies"]) == 1
    assert _one_error_line(capsys.readouterr().err) == \
        "umim: error: RuntimeError: boom (run with -v for the traceback)"
    assert main(["-v", "strategies"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == "umim: error: RuntimeError: boom"
    assert main(["strategies", "-v"]) == 1  # -v after the command works too
    assert "Traceback" in capsys.readouterr().err


def test_os_error_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    def denied(args: Any) -> int:
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr("engine.cli._cmd_strategies", denied)
    assert main(["strategies"]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        f"umim: error: Permission denied: {tmp_path / 'x'}"


def test_keyboard_interrupt_says_how_to_resume(tmp_path: Path, fake_study: SimpleNamespace,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"

    def interrupted(run_dir: Any) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "config.yaml").write_text("name: smoke\n")
        raise KeyboardInterrupt

    fake_study.action = interrupted
    assert main(["run", SMOKE, "--out", str(out)]) == 130
    assert _one_error_line(capsys.readouterr().err) == \
        f"interrupted; continue with: umim resume {out}"
    assert main(["resume", str(out)]) == 130
    assert _one_error_line(capsys.readouterr().err) == \
        f"interrupted; continue with: umim resume {out}"

    def early(run_dir: Any) -> None:  # before the run directory holds a run
        raise KeyboardInterrupt

    fake_study.action = early
    assert main(["run", SMOKE]) == 130
    assert _one_error_line(capsys.readouterr().err) == "interrupted"
    assert main(["run", SMOKE, "--out", str(tmp_path / "fresh")]) == 130
    assert _one_error_line(capsys.readouterr().err) == "interrupted"


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "the following arguments are required: config" in \
        _one_error_line(capsys.readouterr().err)
    assert main(["sweep"]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        "umim sweep: error: give SWEEP.yaml or --resume DIR"


def test_sweep_resume_needs_a_sweep_directory(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--resume", str(tmp_path / "gone")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "gone").exists()
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "holds no sweep.yaml" in _one_error_line(capsys.readouterr().err)


def test_common_flags_on_every_subcommand() -> None:
    parser = build_parser()
    flags = {("run", SMOKE): {"--data-root", "--cache-dir", "--address", "--quiet"},
             ("resume", "d"): {"--data-root", "--cache-dir", "--address", "--quiet"},
             ("sweep", "s.yaml"): {"--data-root", "--cache-dir", "--address", "--quiet"},
             ("bench", "fedavg"): {"--data-root", "--cache-dir", "--address"},
             ("bench", "distill"): {"--data-root", "--cache-dir", "--address"},
             ("bench", "scale"): {"--data-root", "--cache-dir", "--address"},
             ("data", "list"): {"--data-root", "--cache-dir"},
             ("data", "prepare"): {"--data-root", "--cache-dir"},
             ("config", "show", SMOKE): {"--data-root", "--cache-dir", "--address"}}
    values = {"--data-root": "D", "--cache-dir": "C", "--address": "A", "--quiet": None}
    for words, given in flags.items():
        argv = list(words)
        for flag in sorted(given):
            argv += [flag] if values[flag] is None else [flag, values[flag]]
        args = parser.parse_args(argv)
        if "--data-root" in given:
            assert (args.data_root, args.cache_dir) == ("D", "C"), words
        if "--address" in given:
            assert args.address == "A", words
        if "--quiet" in given:
            assert args.quiet is True, words


def _write_experiment(path: Path, extra: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"name": "extra", "data": {
        "domains": ["breast", *extra], "extra_domains": extra}}))
    return path


def test_data_list_with_config_shows_extra_domains(data_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    exp = _write_experiment(tmp_path / "exp.yaml", {
        "adrenal64": {"source": "medmnist", "dataset": "adrenalmnist3d", "size": 64}})
    assert main(["data", "list", "--json", "--config", str(exp), "--data-root",
                 str(data_root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[:8] == ["breast", "pneumonia", "retina", "pathology", "adrenal",
                             "vessel", "ct-region", "mr-xr"]
    assert out["adrenal64"]["train"] == out["adrenal"]["train"] > 0
    assert out["adrenal64"]["in_experiment"] and not out["pneumonia"]["in_experiment"]
    # an extra domain from an override, whose file is missing: a problem row, exit 1
    derma = 'data.extra_domains.derma={source: medmnist, dataset: dermamnist}'
    assert main(["data", "list", "--config", str(exp), derma, "--data-root",
                 str(data_root)]) == 1
    text = capsys.readouterr().out
    assert "adrenal64" in text and "derma" in text and "dermamnist.npz is missing" in text
    assert "experiment 'extra'" in text


def test_data_prepare_with_config_offline(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    exp = _write_experiment(tmp_path / "exp.yaml", {})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "prepare", "--config", str(exp), "data.download=false",
                 "--data-root", str(empty), "--cache-dir", str(tmp_path / "cache")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("umim: data error:") and "breastmnist.npz" in line
    assert main(["data", "prepare", "nope", "--offline", "--data-root", str(empty),
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "unknown domain 'nope'" in _one_error_line(capsys.readouterr().err)


def test_strategies_lists_options_and_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for word in ("universal", "fedavg", "fedprox", "local", "centralised", "proximal_mu",
                 "0.01", "num_stages", "rounds_per_stage", "distils", "pooled"):
        assert word in out, word
    assert main(["strategies", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fedprox"]["options"] == {"proximal_mu": 0.01}
    assert rows["universal"]["declares"] == {"pooled": False, "distils": True,
                                             "predicts": True, "heterogeneous": True}
    assert rows["centralised"]["declares"]["pooled"] and rows["fedavg"]["options"] == {}
    assert rows["universal"]["options"]["local_epochs"] is None
    assert rows["fedavg"]["doc"].startswith("Federated averaging")


def test_sweep_flags_reach_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    def sweep(sweep_file: Any = None, overrides: Any = (), *, out: Any = None,
              resume: Any = None, data_root: str | None = None) -> Any:
        seen.update(file=sweep_file, overrides=list(overrides), out=out, data_root=data_root,
                    cache=os.environ.get("UMIM_CACHE_DIR"),
                    address=os.environ.get("RAY_ADDRESS"))
        return types.SimpleNamespace(summary={"best": None},
                                     study_url="sqlite:///S/optuna.db")

    module = types.ModuleType("engine.tune")
    module.sweep = sweep  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "engine.tune", module)
    monkeypatch.delenv("UMIM_CACHE_DIR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # --quiet lowers it for this sweep
    assert main(["sweep", "s.yaml", "search.num_samples=2", "--out", str(tmp_path),
                 "--data-root", "D", "--cache-dir", "C", "--address", "A", "--quiet"]) == 0
    # sweep() takes no cache_dir / address: they reach it as the variables the engine reads
    assert seen == {"file": "s.yaml", "overrides": ["search.num_samples=2"],
                    "out": str(tmp_path), "data_root": "D", "cache": "C", "address": "A"}
    assert "UMIM_CACHE_DIR" not in os.environ and "RAY_ADDRESS" not in os.environ
    out = capsys.readouterr().out
    assert '"best": null' in out and "optuna-dashboard sqlite:///S/optuna.db" in out
