"""The column contract: one table, the processor's reads derived from it, physical types compared on files."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agc_sx.query import OUTPUT_COLUMNS
from agc_sx.schema import (
    COLUMNS,
    ML_ONLY_COLUMNS,
    SKIM_COLUMNS,
    SchemaError,
    arrow_type_string,
    check_parquet_schema,
    collection_fields,
    needed_columns,
    parquet_column_types,
)


def test_everything_read_is_delivered_with_the_same_type() -> None:
    delivered = dict(OUTPUT_COLUMNS)
    assert [name for name, _, _ in SKIM_COLUMNS] == [name for name, _ in OUTPUT_COLUMNS]
    for name, (jagged, dtype) in COLUMNS.items():
        assert delivered[name] == ("var * " if jagged else "") + dtype
    assert set(COLUMNS) > ML_ONLY_COLUMNS


def test_without_the_bdt_its_inputs_are_not_read() -> None:
    assert set(needed_columns(True)) - set(needed_columns(False)) == ML_ONLY_COLUMNS
    assert "qgl" in collection_fields("Jet", True) and "qgl" not in collection_fields("Jet", False)
    assert collection_fields("Muon", False) == ("pt", "eta", "tightId", "sip3d", "pfRelIso04_all")
    assert "charge" not in collection_fields("Electron", True)  # delivered, read by nothing


def test_physical_types_whoever_wrote_the_file(tmp_path: Path) -> None:
    jets = ak.Array([[1.5, 2.5], []])
    array = ak.zip({"run": ak.Array(np.array([1, 2], dtype=np.uint32)), "Jet_pt": ak.values_astype(jets, np.float32)},
                   depth_limit=1)
    ak.to_parquet(array, tmp_path / "awkward.parquet")
    table = ak.to_arrow_table(array)  # the real ServiceX transformer: awkward extension types in the schema
    with pq.ParquetWriter(tmp_path / "transformer.parquet", table.schema) as writer:
        writer.write_table(table)
    plain = pa.table({"run": pa.array([1, 2], pa.uint32()),
                      "Jet_pt": pa.array([[1.5, 2.5], []], pa.list_(pa.float32()))})
    pq.write_table(plain, tmp_path / "pyarrow.parquet")
    for name in ("awkward", "transformer", "pyarrow"):
        types = parquet_column_types(tmp_path / f"{name}.parquet")
        assert types["run"] == "uint32" and types["Jet_pt"] == "var * float32", name
        check_parquet_schema(tmp_path / f"{name}.parquet", ["run", "Jet_pt"])
    assert arrow_type_string(pa.list_(pa.int32())) == "var * int32"


def test_wrong_type_and_missing_column_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"run": pa.array([1.0], pa.float64())}), tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match="run"):
        check_parquet_schema(tmp_path / "bad.parquet", ["run"])
    with pytest.raises(SchemaError, match="Jet_pt"):
        check_parquet_schema(tmp_path / "bad.parquet", ["Jet_pt"])
