"""The long-format table base: Arrow/Parquet/pandas I/O shared by History and Results."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.records.history import SCHEMA as HISTORY_SCHEMA
from engine.records.history import History, Record
from engine.records.results import SCHEMA as RESULTS_SCHEMA
from engine.records.results import Results, Row
from engine.records.table import LongTable


def _history() -> History:
    h = History()
    h.add(1, "breast", "val", {"auc": 0.5, "acc": 0.4}, domain="breast")
    h.add(2, "", "server", {"fit_seconds": 1.5})
    return h


def _results() -> Results:
    r = Results()
    r.add("universal+ft", 0, "breast", "breast", {"auc": 0.8})
    r.add("mim", 3, "retina#1", "retina", {"auc": 0.7, "acc": float("nan")})
    return r


def test_history_to_pandas_has_the_schema_columns_dtypes_and_values() -> None:
    from pandas.api.types import is_string_dtype

    frame = _history().to_pandas()
    assert list(frame.columns) == ["round", "client", "domain", "phase", "metric", "value"]
    assert str(frame["round"].dtype) == "int32"
    assert str(frame["value"].dtype) == "float64"
    for name in ("client", "domain", "phase", "metric"):
        assert is_string_dtype(frame[name]) and frame[name].dtype == frame["client"].dtype
    assert frame["round"].tolist() == [1, 1, 2]
    assert frame["metric"].tolist() == ["auc", "acc", "fit_seconds"]
    assert frame["domain"].tolist() == ["breast", "breast", ""]
    assert frame["value"].tolist() == [0.5, 0.4, 1.5]


def test_results_to_pandas_has_the_schema_columns_dtypes_and_values() -> None:
    from pandas.api.types import is_string_dtype

    frame = _results().to_pandas()
    assert list(frame.columns) == ["method", "seed", "client", "domain", "metric", "value",
                                  "replicate"]
    assert all(is_string_dtype(frame[n]) for n in ("method", "client", "domain", "metric"))
    assert str(frame["seed"].dtype) == "int64"
    assert str(frame["value"].dtype) == "float64"
    assert frame["method"].tolist() == ["universal+ft", "mim", "mim"]
    assert frame["seed"].tolist() == [0, 3, 3]
    assert frame["value"].iloc[1] == 0.7 and frame["value"].isna().tolist() == [False, False,
                                                                                 True]


@pytest.mark.parametrize("cls", [History, Results])
def test_empty_tables_keep_the_schema(cls: type[LongTable]) -> None:
    empty = cls()
    assert len(empty) == 0
    assert empty.to_table().schema == cls.schema and empty.to_table().num_rows == 0
    frame = empty.to_pandas()
    assert list(frame.columns) == cls.schema.names and len(frame) == 0
    full = _history() if cls is History else _results()
    assert frame.dtypes.tolist() == full.to_pandas().dtypes.tolist()
    back = cls.from_parquet_bytes(empty.to_parquet_bytes())
    assert type(back) is cls and len(back) == 0


def test_round_trips_keep_rows_types_and_the_parquet_schema() -> None:
    h = _history()
    back = History.from_parquet_bytes(h.to_parquet_bytes())
    assert type(back) is History and back.records == h.records and back.rows is back.records
    assert all(type(r) is Record and type(r.round) is int for r in back.records)
    assert pq.read_table(io.BytesIO(h.to_parquet_bytes())).schema == HISTORY_SCHEMA

    r = _results()
    again = Results.from_parquet_bytes(r.to_parquet_bytes())
    assert type(again) is Results and len(again) == 3
    assert again.rows[:2] == r.rows[:2] and all(type(x) is Row for x in again.rows)
    assert pq.read_table(io.BytesIO(r.to_parquet_bytes())).schema == RESULTS_SCHEMA
    assert again.to_pandas().equals(r.to_pandas())  # NaN in the same places counts as equal


def test_history_records_is_the_row_list_and_assignable() -> None:
    h = History([Record(1, "a", "", "fit", "loss", 1.0)])
    assert h.records is h.rows and len(h) == 1
    h.records = []
    assert h.rows == [] and len(h) == 0
    h.add(3, "a", "fit", {"loss": 2.0})
    assert h.rows == [Record(3, "a", "", "fit", "loss", 2.0)]


def test_a_subclass_must_match_its_schema_to_its_rows() -> None:
    @dataclass(frozen=True)
    class Pair:
        name: str
        value: float

    class Pairs(LongTable[Pair]):
        row_type = Pair
        schema = pa.schema([("name", pa.string()), ("value", pa.float64())])

    pairs = Pairs([Pair("a", 1.0), Pair("b", 2.5)])
    assert Pairs.from_parquet_bytes(pairs.to_parquet_bytes()).rows == pairs.rows
    assert pairs.to_pandas().to_dict("list") == {"name": ["a", "b"], "value": [1.0, 2.5]}
    with pytest.raises(TypeError, match="differ from the fields"):
        class Swapped(LongTable[Pair]):
            row_type = Pair
            schema = pa.schema([("value", pa.float64()), ("name", pa.string())])
    with pytest.raises(TypeError, match="must set both"):
        class Half(LongTable[Pair]):
            row_type = Pair
