"""What :func:`engine.tune.sweep` returns: Tune's ``ResultGrid`` with the sweep's summary."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: Ray Tune's ``ResultGrid``, the summary and the Optuna study.

    It offers the grid's own API (``get_dataframe``, ``get_best_result``, ``len``,
    iteration and indexing reach ``grid``), so code written for Tune reads it as it reads
    a ``ResultGrid``.

    Attributes
    ----------
    grid
        Tune's ``ResultGrid`` (one ``Result`` per trial: last metrics, config, path, error).
    summary
        The summary (``summary.json``): trials by state, the best completed trial, its
        parameters and objective, and its margin over the default config's trial.
    dir
        The sweep directory.
    study_url
        The Optuna study's storage URL (``sqlite:///<dir>/optuna.db``): give it to
        ``optuna-dashboard`` or ``optuna.load_study(storage=...)``.
    study_name
        The study's name in that storage (the sweep's name).
    """

    grid: Any = field(repr=False)
    summary: dict[str, Any]
    dir: str
    study_url: str
    study_name: str

    def get_dataframe(self, **options: Any) -> Any:
        """The grid's ``pandas.DataFrame`` (``ResultGrid.get_dataframe``), one row per trial.

        Parameters
        ----------
        **options
            ``filter_metric`` and ``filter_mode`` as ``ResultGrid.get_dataframe`` takes them.
        """
        return self.grid.get_dataframe(**options)

    def get_best_result(self, *args: Any, **options: Any) -> Any:
        """``ResultGrid.get_best_result``: note that it ranks stopped trials too, on their
        objective when stopped; ``summary["best_trial"]`` is the best *completed* trial."""
        return self.grid.get_best_result(*args, **options)

    def load_study(self) -> Any:
        """The sweep's ``optuna.Study``, loaded from its storage."""
        import optuna

        return optuna.load_study(study_name=self.study_name, storage=self.study_url)

    def __len__(self) -> int:
        return len(self.grid)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.grid)

    def __getitem__(self, index: int) -> Any:
        return self.grid[index]
