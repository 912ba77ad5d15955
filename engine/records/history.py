"""The typed run history, written as Parquet in long format."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa

from engine.records.table import LongTable

SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("client", pa.string()),
    ("domain", pa.string()),
    ("phase", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
])


@dataclass(frozen=True)
class Record:
    """One measurement.

    ``phase`` is ``fit`` (client training metrics), ``server`` (aggregation), ``val`` or
    ``test`` (federated evaluation), ``failure`` (a rejected or failed client: ``metric`` is
    ``nonfinite_update``, ``actor_died`` or ``task_error``). ``domain`` is empty when the
    value is not about one domain.
    """

    round: int
    client: str
    domain: str
    phase: str
    metric: str
    value: float


class History(LongTable[Record]):
    """An append-only list of :class:`Record` with Parquet I/O and a few queries.

    The records are :attr:`records` (also :attr:`rows`, the name the base class uses);
    Arrow, Parquet and pandas I/O come from :class:`~engine.records.table.LongTable`, with
    :data:`SCHEMA`.
    """

    row_type = Record
    schema = SCHEMA

    def __init__(self, records: Iterable[Record] = ()) -> None:
        super().__init__(records)

    @property
    def records(self) -> list[Record]:
        """The records, in the order they were added."""
        return self.rows

    @records.setter
    def records(self, value: list[Record]) -> None:
        self.rows = value

    def add(self, server_round: int, client: str, phase: str,
            metrics: Mapping[str, float], domain: str = "") -> None:
        """Append one record per metric."""
        for metric, value in metrics.items():
            self.records.append(Record(server_round, client, domain, phase, metric,
                                       float(value)))

    def truncate(self, after_round: int) -> None:
        """Drop records of rounds after ``after_round`` (used on resume)."""
        self.records = [r for r in self.records if r.round <= after_round]

    def latest(self, phase: str, metric: str) -> dict[tuple[str, str], float]:
        """(client, domain) -> value of ``metric`` in the last round that has it."""
        out: dict[tuple[str, str], tuple[int, float]] = {}
        for r in self.records:
            if r.phase == phase and r.metric == metric and not math.isnan(r.value):
                key = (r.client, r.domain)
                if key not in out or r.round >= out[key][0]:
                    out[key] = (r.round, r.value)
        return {k: v for k, (_, v) in out.items()}
