"""Live progress of a whole run: one display for every step of the pipeline.

A :class:`PipelineProgress` is opened by the driver around a run (``umim run`` /
``umim resume``) and made *current* (:func:`current`); the pipeline's steps feed it with
small calls: the study's steps (setup with MIM pretraining, the main run, each baseline,
each evaluation mode, each LODO domain) with :meth:`~PipelineProgress.begin` /
:meth:`~PipelineProgress.end`, the round loop's phases and clients with
:meth:`~PipelineProgress.task` / :meth:`~PipelineProgress.advance`, and the latest metrics
(mean val AUC per round, distillation agreement, MIM loss) with
:meth:`~PipelineProgress.metric` and :meth:`~PipelineProgress.train_report` (the Ray Train
jobs' reports, forwarded by ``engine.train.feed``).

On a terminal the display is a rich live view: the pipeline bar with the elapsed time and
an ETA, the step in flight, the phase in flight, and a table of the latest metrics. Not on
a terminal (a log file, CI) it writes plain ``logging`` lines instead: a line per step
begun and done (with elapsed and ETA) and a line per new metric. Silent when disabled
(``--quiet``). Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from strategies.distill import LOSS_TERMS

logger = logging.getLogger(__name__)

SETUP_STEP = "setup"
"""The first step of every run: Ray, the clients' shards, the MIM base(s), the actors."""


def _clock(seconds: float | None) -> str:
    """``H:MM:SS`` (or ``-:--:--`` when unknown)."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "-:--:--"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class Metric:
    """The latest value of one metric shown by the display."""

    name: str
    value: float
    detail: str
    step: str


class _Live(Progress):
    """A rich ``Progress`` that renders the owner's metrics table under its bars."""

    def __init__(self, owner: PipelineProgress, *args: Any, **kwargs: Any) -> None:
        self.owner = owner  # before Progress builds its Live, which renders once
        super().__init__(*args, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield Group(self.make_tasks_table(self.tasks), self.owner.metrics_table())


class PipelineProgress:
    """The live display of one run (see the module docstring).

    Parameters
    ----------
    steps
        The run's planned steps in order (``progress/<step>.done`` names, e.g. from
        :func:`engine.run.plan.placement_plan`), :data:`SETUP_STEP` first or not.
    done
        Steps already done (a resumed run): counted as done, not in the ETA.
    disable
        Show and log nothing (``--quiet``).
    console
        Where to draw (default: stderr). Not a terminal: plain log lines instead.
    clock
        The time source (tests).

    The ETA assumes the steps still to run take, on average, as long as the steps run so
    far in this session after the setup (the step in flight counted by its fraction done;
    the setup, with its one-off shards and pretraining, left out): rough, and ``-:--:--``
    until something after the setup is done.
    """

    def __init__(self, steps: Sequence[str] = (), *, done: Iterable[str] = (),
                 disable: bool = False, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = not disable
        self.console = console or Console(stderr=True)
        self.live = self.enabled and self.console.is_terminal
        self.clock = clock
        self.steps = [SETUP_STEP, *(s for s in steps if s != SETUP_STEP)]
        already = set(done)
        self.skipped = sum(s in already for s in self.steps)
        self.done = self.skipped
        self.fraction = 0.0  # of the step in flight
        self.step: str | None = None
        self.step_total = 1.0
        self.step_count = 0.0
        self.step_unit = ""
        self.task_total = 0
        self.task_count = 0
        self.metrics: dict[str, Metric] = {}
        self._lock = threading.RLock()
        self._started = clock()
        self._step_started = self._started
        self._work = (self._started, self.done)  # when the ETA's clock starts, steps done then
        self._previous: PipelineProgress | None = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._bars = _Live(self, TextColumn("{task.description:<38}"), BarColumn(),
                           TextColumn("{task.fields[count]:>12}"), TimeElapsedColumn(),
                           TextColumn("{task.fields[eta]}"), console=self.console,
                           disable=not self.live, refresh_per_second=4, transient=False)
        self._pipeline = self._bars.add_task("pipeline", total=len(self.steps),
                                             count="", eta="")
        self._step_bar = self._bars.add_task("step", total=1, count="", eta="")
        self._task_bar = self._bars.add_task("", total=1, count="", eta="")

    # -- the context -----------------------------------------------------------------------
    def __enter__(self) -> PipelineProgress:
        global _CURRENT
        self._previous, _CURRENT = _CURRENT, self
        self._started = self._step_started = self.clock()
        self._work = (self._started, self.done)
        if self.live:
            self._bars.start()
            self._redirect_logs()
        elif self.enabled:
            logger.info("pipeline: %d step(s), %d already done", len(self.steps), self.skipped)
        self._refresh()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _CURRENT
        _CURRENT = self._previous
        if self.live:
            self._refresh()
            self._bars.stop()
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers = []
        elif self.enabled:
            logger.info("pipeline: %d of %d step(s) done in %s", self.done, len(self.steps),
                        _clock(self.elapsed()))

    def _redirect_logs(self) -> None:
        """Point every logger's terminal handlers (the root's, Ray's own) at the live
        console's redirected streams, so log lines print above the display, not into it."""
        loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                          if isinstance(x, logging.Logger))]
        for handler in {h for lg in loggers for h in lg.handlers}:
            if (isinstance(handler, logging.StreamHandler)
                    and handler.stream in (sys.__stderr__, sys.__stdout__)):
                target = sys.stderr if handler.stream is sys.__stderr__ else sys.stdout
                if target is not handler.stream:
                    self._handlers.append((handler, handler.setStream(target)))

    # -- steps -----------------------------------------------------------------------------
    def begin(self, step: str, *, total: float = 1.0, unit: str = "") -> None:
        """A pipeline step starts; ``total`` units of ``unit`` (e.g. 3 rounds) make it."""
        with self._lock:
            if step not in self.steps:
                self.steps.append(step)
            self.step, self.step_total, self.step_count = step, max(float(total), 1e-9), 0.0
            self.step_unit, self.fraction = unit, 0.0
            self._step_started = self.clock()
            self.task_total = self.task_count = 0
            self._bars.reset(self._step_bar, total=self.step_total,
                             description=f"{step}", count="", eta="")
            self._bars.reset(self._task_bar, total=1, description="", count="", eta="")
        if self.enabled and not self.live:
            logger.info("step %s started (%d/%d)", step, self.done + 1, len(self.steps))
        self._refresh()

    def set_total(self, total: float, unit: str = "") -> None:
        """The step in flight is made of ``total`` units of ``unit`` (e.g. 3 rounds)."""
        with self._lock:
            self.step_total, self.step_unit = max(float(total), 1e-9), unit
            self.fraction = self.step_count / self.step_total
            self._bars.update(self._step_bar, total=self.step_total)
        self._refresh()

    def advance_step(self, n: float = 1.0) -> None:
        """``n`` more units of the step in flight are done."""
        with self._lock:
            self.step_count = min(self.step_count + n, self.step_total)
            self.fraction = self.step_count / self.step_total
        self._refresh()

    def end(self, step: str, seconds: float | None = None) -> None:
        """A pipeline step is done (``seconds``: how long it took, for the log line)."""
        with self._lock:
            self.done = min(self.done + 1, len(self.steps))
            self.step, self.fraction, self.step_count = None, 0.0, self.step_total
            taken = self.clock() - self._step_started if seconds is None else seconds
            if step == SETUP_STEP:
                self._work = (self.clock(), self.done)
        if self.enabled and not self.live:
            logger.info("step %s done in %.1f s (%d/%d steps; elapsed %s, ETA %s)", step,
                        taken, self.done, len(self.steps), _clock(self.elapsed()),
                        _clock(self.eta()))
        self._refresh()

    @contextlib.contextmanager
    def stepping(self, step: str, *, total: float = 1.0, unit: str = "") -> Iterator[None]:
        """``begin`` then ``end`` around a block."""
        self.begin(step, total=total, unit=unit)
        yield
        self.end(step)

    # -- the phase in flight (clients, distillation steps, epochs) --------------------------
    def task(self, description: str, total: int) -> None:
        """A new phase of the step in flight: ``total`` things to do (clients, steps)."""
        with self._lock:
            self.task_total, self.task_count = int(total), 0
            self._bars.reset(self._task_bar, total=max(int(total), 1),
                             description=f"  {description}", count="", eta="")
        self._refresh()

    def advance(self, n: int = 1) -> None:
        """``n`` more things of the phase in flight are done (e.g. one more client)."""
        with self._lock:
            self.task_count = min(self.task_count + n, self.task_total)
        self._refresh()

    def task_at(self, count: int) -> None:
        """The phase in flight has done ``count`` things (e.g. distillation step 75)."""
        with self._lock:
            self.task_count = min(int(count), self.task_total)
        self._refresh()

    # -- metrics ---------------------------------------------------------------------------
    def metric(self, name: str, value: float, detail: str = "") -> None:
        """The latest value of a metric (shown until the next one of the same name)."""
        with self._lock:
            self.metrics[name] = Metric(name, float(value), detail, self.step or "")
        if self.enabled and not self.live:
            logger.info("%s%s = %.4f%s", f"{self.step}: " if self.step else "", name,
                        float(value), f" ({detail})" if detail else "")
        self._refresh()

    def train_report(self, knob: str, job: str, row: Mapping[str, Any]) -> None:
        """One report of a Ray Train job (``knob``: ``pretrain`` or ``distill``): advances
        its phase and shows its metrics (MIM loss; distillation agreement and loss terms)."""
        counter = "epoch" if "epoch" in row else "step" if "step" in row else None
        if counter is not None:
            self.task_at(int(row[counter]))
        parts = [] if job == self.step else [job]  # a LODO job is named as its step
        if counter is not None:
            parts.append(f"{counter} {int(row[counter])}"
                         + (f"/{self.task_total}" if self.task_total else ""))
        where = ", ".join(parts)
        if "mim_loss" in row:
            self.metric("MIM loss", float(row["mim_loss"]), where)
        if "agreement" in row:
            self.metric("distill agreement", float(row["agreement"]), where)
        if "loss" in row and knob == "distill":
            terms = ", ".join(f"{t} {float(row[t]):.3g}" for t in LOSS_TERMS if t in row)
            self.metric("distill loss", float(row["loss"]), f"{where}; {terms}")

    # -- time ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the display opened."""
        return self.clock() - self._started

    def eta(self) -> float | None:
        """Seconds still to go (see the class docstring), or ``None`` when unknown."""
        with self._lock:
            since, done_then = self._work
            ran = self.done - done_then + self.fraction
            left = len(self.steps) - self.done - self.fraction
            if ran <= 1e-9 or self.step == SETUP_STEP:
                return None
            return max((self.clock() - since) / ran * left, 0.0)

    # -- rendering -------------------------------------------------------------------------
    def metrics_table(self) -> Table:
        """The latest metrics as a rich table (metric, value, where it came from)."""
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_column(style="dim")
        # no lock here: rich's refresh thread calls this holding the Live's lock, and the
        # driver's thread calls rich (which takes that lock) holding ours; list() of a
        # dict's values is one step under the GIL
        shown = list(self.metrics.values())
        for m in shown:
            where = ", ".join(x for x in (m.step, m.detail) if x)
            table.add_row(f"  {m.name}", f"{m.value:.4f}", where)
        return table

    def _refresh(self) -> None:
        if not self.live:
            return
        with self._lock:
            steps = len(self.steps)
            self._bars.update(self._pipeline, total=steps, completed=self.done + self.fraction,
                              count=f"{self.done}/{steps} steps",
                              eta=f"ETA {_clock(self.eta())}")
            if self.step is not None:
                unit = f" {self.step_unit}" if self.step_unit else ""
                self._bars.update(self._step_bar, completed=self.step_count,
                                  count=f"{self.step_count:g}/{self.step_total:g}{unit}")
            if self.task_total:
                self._bars.update(self._task_bar, completed=self.task_count,
                                  count=f"{self.task_count}/{self.task_total}")


_CURRENT: PipelineProgress | None = None
_NULL = PipelineProgress(disable=True, console=Console(file=io.StringIO()))


def current() -> PipelineProgress:
    """The open display of this process, or a disabled one that ignores every call."""
    return _CURRENT if _CURRENT is not None else _NULL


class RunProgress:
    """The round loop's view of the display: rounds of the step in flight, the clients of
    each phase, the mean val AUC per round.

    Inside an open :class:`PipelineProgress` (a study) it feeds that display; alone (a
    sweep trial, a benchmark, a bare ``Simulation``) it opens its own one-step display,
    ``disable`` as given.
    """

    def __init__(self, rounds: int, clients: int, *, disable: bool = False) -> None:
        self.rounds = rounds
        outer = current()
        self.own = None if outer.enabled else PipelineProgress(["run"], disable=disable)
        self.display = outer if self.own is None else self.own

    def __enter__(self) -> RunProgress:
        if self.own is not None:
            self.own.__enter__()
            self.own.begin("run", total=self.rounds, unit="rounds")
        elif self.display.step is not None:
            self.display.set_total(self.rounds, "rounds")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.own is not None:
            if exc is None:
                self.own.end("run")
            self.own.__exit__(exc_type, exc, tb)

    def advance_rounds(self, n: int) -> None:
        """Mark ``n`` more rounds done."""
        if n:
            self.display.advance_step(n)

    def start_phase(self, description: str, total: int) -> None:
        """A new phase of the round (``round 2 fit``) with ``total`` clients."""
        self.display.task(description, total)

    def client_done(self) -> None:
        """One more client finished the phase."""
        self.display.advance(1)

    def metric(self, name: str, value: float, detail: str = "") -> None:
        """A metric of the run (e.g. the mean val AUC of a round)."""
        self.display.metric(name, value, detail)
