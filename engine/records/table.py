"""Typed rows in long format, with Arrow, Parquet and pandas I/O.

A :class:`LongTable` subclass names its row dataclass and its Arrow schema, whose columns
are the dataclass's fields in order::

    @dataclass(frozen=True)
    class Row:
        name: str
        value: float

    class Rows(LongTable[Row]):
        row_type = Row
        schema = pa.schema([("name", pa.string()), ("value", pa.float64())])

:class:`engine.records.history.History` and :class:`engine.records.results.Results` are
the two tables of a run.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import astuple, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import pandas as pd

RowT = TypeVar("RowT")


class LongTable(Generic[RowT]):
    """A list of frozen dataclass rows (``rows``) that converts to and from Arrow.

    Attributes
    ----------
    row_type
        The row dataclass (class attribute of a subclass).
    schema
        The Arrow schema: one column per field of ``row_type``, same names, same order
        (class attribute of a subclass; checked when the subclass is defined).
    rows
        The rows, in insertion order.
    """

    row_type: ClassVar[type[Any]]
    schema: ClassVar[pa.Schema]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        row_type = cls.__dict__.get("row_type")
        schema = cls.__dict__.get("schema")
        if row_type is None and schema is None:
            return  # an intermediate base; its subclasses declare both
        if row_type is None or schema is None or not is_dataclass(row_type):
            raise TypeError(f"{cls.__name__} must set both row_type (a dataclass) and schema")
        names = [f.name for f in fields(row_type)]
        if names != schema.names:
            raise TypeError(f"{cls.__name__}: schema columns {schema.names} differ from the "
                            f"fields of {row_type.__name__} {names}")

    def __init__(self, rows: Iterable[RowT] = ()) -> None:
        self.rows: list[RowT] = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def to_table(self) -> pa.Table:
        """The rows as an Arrow table with :attr:`schema` (no rows: an empty table)."""
        columns = list(zip(*(astuple(r) for r in self.rows), strict=True)) or \
            [[] for _ in self.schema]
        return pa.table([pa.array(c, type=f.type)
                         for c, f in zip(columns, self.schema, strict=True)],
                        schema=self.schema)

    def to_parquet_bytes(self) -> bytes:
        """Parquet bytes of :meth:`to_table`."""
        sink = io.BytesIO()
        pq.write_table(self.to_table(), sink)
        return sink.getvalue()

    @classmethod
    def from_parquet_bytes(cls, data: bytes) -> Self:
        """Inverse of :meth:`to_parquet_bytes`: rows built from the columns by name."""
        table = pq.read_table(io.BytesIO(data))
        return cls(cls.row_type(**row) for row in table.to_pylist())

    def to_pandas(self) -> pd.DataFrame:
        """The rows as a pandas DataFrame, one column per schema column.

        Returns
        -------
        pandas.DataFrame
            Columns in schema order, with the dtypes pyarrow maps the schema's types to
            (``int32`` -> ``int32``, ``int64`` -> ``int64``, ``float64`` -> ``float64``,
            ``string`` -> pandas' string column type), also when there are no rows.
        """
        import pandas  # noqa: F401  (a clear ImportError here when pandas is missing)

        return self.to_table().to_pandas()
