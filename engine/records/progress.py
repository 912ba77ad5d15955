"""Rich progress display of rounds and clients (silent with ``--quiet``)."""

from __future__ import annotations

from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunProgress:
    """Two bars: rounds done, and the clients of the phase in flight."""

    def __init__(self, rounds: int, clients: int, *, disable: bool = False) -> None:
        self.progress = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), disable=disable)
        self.rounds = self.progress.add_task("rounds", total=rounds)
        self.phase = self.progress.add_task("clients", total=clients)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()

    def advance_rounds(self, n: int) -> None:
        """Mark ``n`` more rounds done."""
        self.progress.advance(self.rounds, n)

    def start_phase(self, description: str, total: int) -> None:
        """Reset the client bar for a new phase."""
        self.progress.reset(self.phase, total=total, description=description)

    def client_done(self) -> None:
        """One more client finished the phase."""
        self.progress.advance(self.phase, 1)
