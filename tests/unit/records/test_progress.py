"""The pipeline's progress display: plain log lines with metrics off a terminal, a rich
live view on one, the round loop's adapter feeding the open display, and the ETA."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from engine.records.progress import SETUP_STEP, PipelineProgress, RunProgress, current


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _pipeline(display: PipelineProgress, clock: _Clock) -> None:
    """Setup with MIM pretraining, a two-round main run with distillation, a baseline."""
    display.begin(SETUP_STEP)
    display.task("pretrain mim-1", 3)
    display.train_report("pretrain", "mim-1", {"epoch": 3, "mim_loss": 0.0412})
    assert display.eta() is None  # nothing but the setup yet
    clock.t += 30
    display.end(SETUP_STEP)
    display.begin("main")
    with RunProgress(2, 8) as loop:  # inside an open display: feeds it
        assert loop.own is None
        for rnd in (1, 2):
            loop.start_phase(f"round {rnd} fit", 8)
            for _ in range(8):
                loop.client_done()
            display.task(f"distill distill-round-000{rnd}", 100)
            display.train_report("distill", f"distill-round-000{rnd}",
                                 {"step": 75, "agreement": 0.9283, "loss": 0.0043,
                                  "kd": 0.0017, "feature": 0.0256, "retention": 0.0})
            loop.metric("val AUC (mean)", 0.70 + 0.01 * rnd, f"round {rnd}/2")
            loop.advance_rounds(1)
            clock.t += 5
    display.end("main")


def test_off_a_terminal_it_logs_steps_and_metrics(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    console = Console(file=io.StringIO())  # not a terminal
    caplog.set_level(logging.INFO, logger="engine.records.progress")
    with PipelineProgress(["main", "baseline-fedavg-seed0", "finetune"], done=["finetune"],
                          console=console, clock=clock) as display:
        assert current() is display and not display.live
        _pipeline(display, clock)
        assert display.done == 3  # finetune was done before
        assert display.eta() == pytest.approx(10)  # main took 10 s (the setup left out), 1 to go
    assert current() is not display and not current().enabled
    lines = [r.getMessage() for r in caplog.records]
    assert "pipeline: 4 step(s), 1 already done" in lines
    assert "setup: MIM loss = 0.0412 (mim-1, epoch 3/3)" in lines
    assert "main: val AUC (mean) = 0.7200 (round 2/2)" in lines
    assert "main: distill agreement = 0.9283 (distill-round-0002, step 75/100)" in lines
    assert any(x.startswith("main: distill loss = 0.0043 (distill-round-0001, step 75/100; "
                            "kd 0.0017, feature 0.0256, retention 0)") for x in lines)
    assert ("step main done in 10.0 s (3/4 steps; elapsed 0:00:40, ETA 0:00:10)" in lines)
    assert console.file.getvalue() == ""  # no live drawing off a terminal


def test_on_a_terminal_it_renders_bars_eta_and_metrics(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    out = io.StringIO()
    console = Console(force_terminal=True, file=out, width=150)
    caplog.set_level(logging.INFO, logger="engine.records.progress")
    with PipelineProgress(["main", "baseline-fedavg-seed0"], console=console,
                          clock=clock) as display:
        assert display.live
        _pipeline(display, clock)
        display.begin("baseline-fedavg-seed0", total=3, unit="rounds")
        display.advance_step(1)
        display.task("round 2 fit", 8)
        display.advance(3)
        console.print(display._bars.get_renderable())
    text = out.getvalue()
    assert "2/3 steps" in text and "ETA 0:00:" in text
    assert "baseline-fedavg-seed0" in text and "1/3 rounds" in text and "3/8" in text
    for shown in ("val AUC (mean)", "0.7200", "distill agreement", "0.9283", "MIM loss",
                  "0.0412"):
        assert shown in text
    assert not [r for r in caplog.records if r.name == "engine.records.progress"]


def test_alone_the_round_loop_opens_its_own_display_or_none_when_quiet() -> None:
    with RunProgress(3, 4, disable=True) as loop:
        assert loop.own is not None and not loop.display.enabled
        loop.start_phase("round 1 fit", 4)
        loop.client_done()
        loop.advance_rounds(1)
        assert loop.display.fraction == pytest.approx(1 / 3)
    assert not current().enabled
