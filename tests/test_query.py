"""The skim query: its qastle text, its columns, and running it through the func-adl-uproot path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import awkward as ak
import numpy as np
import pytest

from agc_sx import constants as C
from agc_sx.query import (
    OUTPUT_COLUMN_NAMES,
    OUTPUT_COLUMNS,
    QueryError,
    column_types,
    empty_skim,
    execute,
    query_text,
    schema_problems,
    skim_query,
)
from agc_sx.resources import queries_dir
from agc_sx.utils import sha256_text


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory, nanoaod_writer) -> Path:
    return nanoaod_writer(tmp_path_factory.mktemp("q") / "small.root", 300, 11)


def test_query_text_carries_the_cut_values_from_constants() -> None:
    text = query_text()
    for value in (C.LEPTON_PT_MIN, C.LEPTON_ABS_ETA_MAX, C.LEPTON_SIP3D_MAX, C.MUON_ISO_MAX,
                  C.SKIM_JET_PT_MIN, C.JET_ABS_ETA_MAX, C.BTAG_WP):
        assert f" {value!r})" in text, value
    assert f"(& (attr j 'jetId') {C.JET_ID_MASK})" in text
    assert "(>= (call (attr" in text and f" {C.MIN_JETS})))" in text
    assert "(> (attr j 'btag') 0.5)" in text  # strictly greater
    assert "(< (attr mu 'sip3d') 4.0)" in text  # the AGC query forgot this one
    # no name survives un-inlined: qastle would send it to the server as an unknown identifier
    assert not re.search(r"[A-Z]{3,}_[A-Z]", text)


def test_query_selects_exactly_the_listed_columns(skim_branches: tuple[str, ...]) -> None:
    text = query_text()
    select = text[text.rindex("(lambda (list e) (dict (list ") :]
    keys = re.findall(r"'(\w+)'", select.split(") (list (attr")[0])
    assert tuple(keys) == OUTPUT_COLUMN_NAMES == skim_branches
    assert [name for name, _ in OUTPUT_COLUMNS] == keys


def test_query_fingerprint_is_sha256_of_the_text() -> None:
    text = query_text()
    assert sha256_text(text) == sha256_text(str(text))
    assert re.fullmatch(r"[0-9a-f]{64}", sha256_text(text))
    assert sha256_text(text) != sha256_text(text.replace("25.0", "30.0"))
    assert query_text("Other") != text and "'Other'" in query_text("Other")


def test_skim_source_has_one_lambda_per_line() -> None:
    """func_adl finds a lambda by its source line: two on one line break the query."""
    source = (queries_dir() / "skim.py").read_text()
    lines = [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Lambda)]
    assert len(lines) >= 8
    assert len(lines) == len(set(lines))


def test_skim_query_is_a_servicex_funcadl_uproot_query() -> None:
    from servicex.query import FuncADL_Uproot

    q = skim_query()
    assert isinstance(q, FuncADL_Uproot)
    assert q.generate_selection_string() == query_text()


def test_execute_matches_reference_and_accepts_file_urls(small_file: Path, reference_skim) -> None:
    expected = reference_skim(small_file)
    assert len(expected) > 5
    got = execute(query_text(), str(small_file))
    assert ak.array_equal(got, expected)
    via_url = execute(query_text(), small_file.resolve().as_uri())
    assert ak.array_equal(via_url, got)
    assert schema_problems(column_types(got)) == []  # uproot-written int32 counters are accepted


def test_execute_from_threads_always_runs_synchronously(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads of one process (the ServiceX double's transforms) must not undo each other's ``scheduler="sync"``:
    the one that leaves first would leave the other computing on dask's threaded pool."""
    import threading
    import time

    import dask

    import agc_sx.query as query

    seen: list[object] = []

    def fake_compiled(qastle: str):  # stands for func-adl-uproot's function: it computes at its end
        def run_query(path: str, tree: str) -> ak.Array:
            time.sleep(float(path))
            seen.append(dask.config.get("scheduler", None))
            return ak.Array([1])
        return run_query

    monkeypatch.setattr(query, "compiled", fake_compiled)
    threads = [threading.Thread(target=execute, args=("q", str(0.05 * (i + 1)))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["sync"] * 3


def test_empty_skim_has_every_column_and_type() -> None:
    empty = empty_skim()
    assert len(empty) == 0
    assert column_types(empty) == dict(OUTPUT_COLUMNS)


def test_schema_problems_name_the_column() -> None:
    types = dict(OUTPUT_COLUMNS)
    types["Jet_eta"] = "var * float64"
    del types["Muon_charge"]
    types["MET_pt"] = "float32"
    problems = " | ".join(schema_problems(types))
    assert "Jet_eta" in problems and "Muon_charge" in problems and "MET_pt" in problems
    types = dict(OUTPUT_COLUMNS, nJet="int32")
    assert schema_problems(types) == []


def test_unsupported_inputs_fail_with_one_line(small_file: Path) -> None:
    with pytest.raises(QueryError, match="unsupported URL scheme"):
        execute(query_text(), "gopher://example.org/x.root")
    import importlib.util

    if importlib.util.find_spec("fsspec_xrootd") is None and importlib.util.find_spec("XRootD") is None:
        with pytest.raises(QueryError, match="fsspec-xrootd"):
            execute(query_text(), "root://eospublic.cern.ch//eos/x.root")
    with pytest.raises(QueryError, match="cannot translate"):
        execute("(call Nonsense", str(small_file))


def test_float32_cut_edges_are_in_the_test_data(small_file: Path) -> None:
    """The reference comparison only has teeth if values sit exactly on the cuts."""
    import uproot

    a = uproot.open(small_file)["Events"].arrays(["Muon_eta", "Electron_eta", "Jet_btagCSVV2", "Jet_pt"])
    assert ak.any(abs(a.Muon_eta) == np.float32(2.1)) or ak.any(abs(a.Electron_eta) == np.float32(2.1))
    assert ak.any(a.Jet_btagCSVV2 == np.float32(0.5))
    assert ak.any(a.Jet_pt == np.float32(29.2))


def test_processor_columns_are_a_subset_of_what_the_skim_delivers() -> None:
    """The delivery contract (query) and the processor's input contract (schema) cannot drift apart."""
    from agc_sx.query import OUTPUT_COLUMNS
    from agc_sx.schema import COLUMNS

    delivered = dict(OUTPUT_COLUMNS)
    for name, (jagged, dtype) in COLUMNS.items():
        assert name in delivered, name
        assert delivered[name] == (f"var * {dtype}" if jagged else dtype), name


def test_query_text_is_cached_under_a_key_of_what_makes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached qastle is the generated one; another tree is another key; an empty cache file is rebuilt."""
    from agc_sx import query

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    query.query_text.cache_clear()
    try:
        fresh = query.query_text("Events")
        cached = list((tmp_path / "agc-sx" / "qastle").glob("*.txt"))
        assert len(cached) == 1 and cached[0].read_text() == fresh
        assert query._query_cache("Events") == cached[0] != query._query_cache("events")
        cached[0].write_text("")
        query.query_text.cache_clear()
        assert query.query_text("Events") == fresh == cached[0].read_text()
        with query._quiet_func_adl():
            assert fresh == str(query.skim_query("Events").generate_selection_string())
    finally:
        query.query_text.cache_clear()
