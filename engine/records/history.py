"""The typed run history, written as Parquet in long format."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

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


class History:
    """An append-only list of :class:`Record` with Parquet I/O and a few queries."""

    def __init__(self, records: Iterable[Record] = ()) -> None:
        self.records: list[Record] = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, server_round: int, client: str, phase: str,
            metrics: Mapping[str, float], domain: str = "") -> None:
        """Append one record per metric."""
        for metric, value in metrics.items():
            self.records.append(Record(server_round, client, domain, phase, metric,
                                       float(value)))

    def truncate(self, after_round: int) -> None:
        """Drop records of rounds after ``after_round`` (used on resume)."""
        self.records = [r for r in self.records if r.round <= after_round]

    def to_table(self) -> pa.Table:
        """The history as an Arrow table with :data:`SCHEMA`."""
        columns = list(zip(*(astuple(r) for r in self.records), strict=True)) or \
            [[] for _ in fields(Record)]
        return pa.table([pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA, strict=True)],
                        schema=SCHEMA)

    def to_parquet_bytes(self) -> bytes:
        """Parquet bytes of :meth:`to_table`."""
        sink = io.BytesIO()
        pq.write_table(self.to_table(), sink)
        return sink.getvalue()

    @classmethod
    def from_parquet_bytes(cls, data: bytes) -> History:
        """Inverse of :meth:`to_parquet_bytes`."""
        table = pq.read_table(io.BytesIO(data))
        return cls(Record(*row.values()) for row in table.to_pylist())

    def latest(self, phase: str, metric: str) -> dict[tuple[str, str], float]:
        """(client, domain) -> value of ``metric`` in the last round that has it."""
        out: dict[tuple[str, str], tuple[int, float]] = {}
        for r in self.records:
            if r.phase == phase and r.metric == metric and not math.isnan(r.value):
                key = (r.client, r.domain)
                if key not in out or r.round >= out[key][0]:
                    out[key] = (r.round, r.value)
        return {k: v for k, (_, v) in out.items()}
