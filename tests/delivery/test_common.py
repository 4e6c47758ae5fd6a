"""What every backend shares: planning what to (re)do, verified storing, recording failures."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import pytest

from agc_sx.catalogue import InputFile, Sample
from agc_sx.delivery.common import (
    DeliveryError,
    finish_sample,
    open_delivery,
    plan,
    record_failure,
    store_output,
)
from agc_sx.manifest import Manifest
from agc_sx.query import empty_skim

SHA = "a" * 64


def _sample(*nevts: int) -> Sample:
    files = tuple(InputFile(f"/data/in_{i}.root", n) for i, n in enumerate(nevts))
    return Sample("ttbar", "nominal", files, 396.87, sum(nevts))


def test_store_then_plan_again_is_done_and_damage_is_redone(tmp_path: Path) -> None:
    sample = _sample(10, 20)
    with open_delivery(tmp_path, "query", SHA) as manifest:
        p = plan(manifest, sample, SHA)
        assert [f.path for f in p.todo] == [f.path for f in sample.files] and not p.done
        for f in p.todo:
            store_output(manifest, p, f, empty_skim(), query_sha256=SHA)
        finish_sample(manifest, p)
    record = Manifest.load(tmp_path).samples["ttbar__nominal"]
    assert record.status == "complete" and record.nevts_total == 30
    assert [o.file for o in record.outputs] == ["ttbar__nominal/in_0.parquet", "ttbar__nominal/in_1.parquet"]

    with open_delivery(tmp_path, "query", SHA) as manifest:
        again = plan(manifest, sample, SHA)
        assert len(again.done) == 2 and not again.todo
        (tmp_path / "ttbar__nominal" / "in_1.parquet").write_bytes(b"damaged")
        damaged = plan(manifest, sample, SHA)
        assert [f.path for f in damaged.todo] == ["/data/in_1.root"]
        other_query = plan(manifest, sample, "b" * 64)
        assert len(other_query.todo) == 2
        forced = plan(manifest, sample, SHA, force=True)
        assert len(forced.todo) == 2


def test_a_changed_nevts_is_redone(tmp_path: Path) -> None:
    with open_delivery(tmp_path, "query", SHA) as manifest:
        p = plan(manifest, _sample(10), SHA)
        store_output(manifest, p, p.todo[0], empty_skim(), query_sha256=SHA)
        finish_sample(manifest, p)
        assert len(plan(manifest, _sample(11), SHA).todo) == 1


def test_a_failure_leaves_the_sample_incomplete_with_its_reason(tmp_path: Path) -> None:
    sample = _sample(10, 20)
    with open_delivery(tmp_path, "query", SHA) as manifest:
        p = plan(manifest, sample, SHA)
        store_output(manifest, p, sample.files[0], empty_skim(), query_sha256=SHA)
        record_failure(manifest, p, sample.files[1], OSError("server said no\nand a long traceback"))
        finish_sample(manifest, p)
    record = Manifest.load(tmp_path).samples["ttbar__nominal"]
    assert record.status == "incomplete"
    assert [(f.path, f.error) for f in record.failed] == [("/data/in_1.root", "server said no")]


def test_an_output_without_the_skim_columns_is_refused_and_not_recorded(tmp_path: Path) -> None:
    sample = _sample(10)
    with open_delivery(tmp_path, "query", SHA) as manifest:
        p = plan(manifest, sample, SHA)
        with pytest.raises(DeliveryError):
            store_output(manifest, p, sample.files[0], ak.Array({"run": [1, 2]}), query_sha256=SHA)
        assert not p.record.outputs
    assert not list((tmp_path / "ttbar__nominal").glob("*.parquet"))


def _one_event() -> ak.Array:
    """One event of the skim's columns and types, no objects."""
    import numpy as np

    from agc_sx.query import OUTPUT_COLUMNS

    columns = {}
    for name, typ in OUTPUT_COLUMNS:
        dtype = typ.removeprefix("var * ")
        columns[name] = (ak.unflatten(np.zeros(0, dtype=dtype), [0]) if typ.startswith("var")
                         else ak.Array(np.zeros(1, dtype=dtype)))
    return ak.zip(columns, depth_limit=1)


def test_a_written_file_is_checked_without_reading_it_back(tmp_path: Path) -> None:
    """verify_written: the array's types, missing values and counters, and the file's footer."""
    from agc_sx.delivery.common import verify_written, write_parquet

    path = tmp_path / "out.parquet"
    good = write_parquet(_one_event(), path)
    assert verify_written(path, good) == 1
    holed = ak.with_field(good, ak.mask(good.run, [False]), "run")
    write_parquet(holed, path)
    with pytest.raises(DeliveryError, match="run"):
        verify_written(path, holed)
    bad_counter = ak.with_field(good, ak.values_astype(ak.Array([3]), "uint32"), "nJet")
    write_parquet(bad_counter, path)
    with pytest.raises(DeliveryError, match="nJet differs"):
        verify_written(path, bad_counter)
    write_parquet(good, path)
    path.write_bytes(path.read_bytes()[:-20])  # the footer is gone
    with pytest.raises(DeliveryError, match="unreadable parquet"):
        verify_written(path, good)
