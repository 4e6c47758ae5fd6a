"""The sample catalogue: loading, validation, the AGC importer, filesets and ``agc-sx samples``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agc_sx.catalogue import CatalogError, import_agc_catalog, load_catalog, parse_catalog, save_catalog
from agc_sx.cli import main
from agc_sx.constants import LUMI_PB, XSEC_PB
from agc_sx.resources import default_catalog

SHARED_AGC = Path(__file__).resolve().parents[2] / "shared" / "agc"


def small_catalog() -> dict:
    return {
        "ttbar": {
            "nominal": {
                "nevts_total": 30,
                "files": [{"path": "/data/a.root", "nevts": 10}, {"path": "/data/b.root", "nevts": 20}],
            },
            "ME_var": {"nevts_total": 5, "xsec": 1.5, "files": [{"path": "/data/c.root", "nevts": 5}]},
        },
        "wjets": {"nominal": {"nevts_total": 7, "files": [{"path": "/data/w.root", "nevts": 7}]}},
    }


def test_builtin_cross_sections_follow_the_agc_table() -> None:
    assert XSEC_PB["ttbar"] == pytest.approx(729.84)
    assert XSEC_PB["single_top_s_chan"] == pytest.approx(3.2944)
    assert XSEC_PB["single_top_t_chan"] == pytest.approx(234.7937, rel=1e-6)
    assert XSEC_PB["single_top_tW"] == pytest.approx(75.842)
    assert XSEC_PB["wjets"] == pytest.approx(15487.164)
    assert LUMI_PB == 3378


def test_round_trip_fills_xsec(tmp_path: Path) -> None:
    catalog = parse_catalog(small_catalog())
    assert catalog.names == ["ttbar__nominal", "ttbar__ME_var", "wjets__nominal"]
    assert catalog["ttbar__nominal"].xsec == XSEC_PB["ttbar"]
    assert catalog["ttbar__ME_var"].xsec == 1.5
    save_catalog(catalog, tmp_path / "c.json")
    again = load_catalog(tmp_path / "c.json")
    assert again.samples == catalog.samples
    assert json.loads((tmp_path / "c.json").read_text())["wjets"]["nominal"]["xsec"] == XSEC_PB["wjets"]


def test_first_n_files_normalise_with_their_own_counts() -> None:
    catalog = parse_catalog(small_catalog()).select(n_files=1)
    nominal = catalog["ttbar__nominal"]
    assert [f.path for f in nominal.files] == ["/data/a.root"]
    assert nominal.nevts_total == 10
    assert nominal.weight == pytest.approx(XSEC_PB["ttbar"] * LUMI_PB / 10)
    fileset = catalog.fileset()
    assert fileset["ttbar__nominal"]["files"] == {"/data/a.root": "Events"}
    assert fileset["ttbar__nominal"]["metadata"]["nevts"] == 10


def test_select_by_sample_or_process() -> None:
    catalog = parse_catalog(small_catalog())
    assert catalog.select(["ttbar"]).names == ["ttbar__nominal", "ttbar__ME_var"]
    assert catalog.select(["wjets__nominal"]).names == ["wjets__nominal"]
    with pytest.raises(CatalogError, match="unknown sample"):
        catalog.select(["zjets"])


def _mutate(path: tuple, value: object) -> dict:
    data = small_catalog()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "non-empty JSON object"),
        (_mutate(("ttbar", "nominal", "files"), "x.root"), "ttbar/nominal: 'files' must be a list"),
        (_mutate(("ttbar", "nominal", "files"), []), "ttbar/nominal: empty file list"),
        (_mutate(("ttbar", "nominal", "nevts_total"), -3), "ttbar/nominal: nevts_total is -3: it must be positive"),
        (_mutate(("ttbar", "nominal", "nevts_total"), 0), "ttbar/nominal: nevts_total is 0"),
        (_mutate(("ttbar", "nominal", "files"), [{"path": "/a.root", "nevts": 0}]), "files\\[0\\].nevts is 0: a file's"),
        (_mutate(("ttbar", "nominal", "nevts_total"), "many"), "nevts_total must be an integer"),
        (_mutate(("ttbar", "nominal", "files"), [{"path": "/a.root", "nevts": -1}]), "files\\[0\\].nevts is -1"),
        (_mutate(("ttbar", "nominal", "files"), [{"path": "/a.root", "nevts": 1.5}]), "nevts must be an integer"),
        (_mutate(("ttbar", "nominal", "files"), [{"path": 3, "nevts": 1}]), "path must be a non-empty string"),
        (_mutate(("zjets",), {"nominal": {"files": [{"path": "/z.root", "nevts": 1}]}}), "zjets/nominal: unknown process"),
        (_mutate(("wjets", "nominal", "files"), [{"path": "/data/a.root", "nevts": 1}]), "duplicate file /data/a.root"),
        # the same file under another spelling is found by its resolved path
        (_mutate(("wjets", "nominal", "files"), [{"path": "/data/x/../a.root", "nevts": 1}]),
         "duplicate file /data/x/../a.root \\(also in ttbar/.* as /data/a.root\\)"),
        (_mutate(("ttbar", "ME_var", "xsec"), "big"), "xsec must be a non-negative number"),
    ],
)
def test_bad_catalogues_name_the_offending_entry(data: object, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(data, "cat.json")


def test_not_json_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON") as err:
        load_catalog(bad)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(main, ["samples", "--catalog", str(bad)])
    assert result.exit_code == 1
    assert "agc-sx: error:" in result.output and "not valid JSON" in result.output


def test_bundled_catalogue_is_the_agc_2015_set() -> None:
    catalog = load_catalog(default_catalog())
    assert len(catalog) == 9
    assert catalog.n_files == 787
    assert catalog.nevts == 940_160_174
    assert {s.variation for s in catalog if s.process == "ttbar"} == {
        "nominal", "scaledown", "scaleup", "ME_var", "PS_var",
    }
    assert all(s.variation == "nominal" for s in catalog if s.process != "ttbar")


def test_samples_command_prints_totals() -> None:
    result = CliRunner().invoke(main, ["samples"])
    assert result.exit_code == 0, result.output
    assert "787" in result.output and "940,160,174" in result.output
    result = CliRunner().invoke(main, ["samples", "--n-files", "1"])
    assert result.exit_code == 0
    assert "\n│ total" in result.output and " 9 " in result.output


@pytest.mark.skipif(not (SHARED_AGC / "nanoaod_inputs.json").exists(), reason="../shared/agc not available")
def test_importer_reproduces_the_bundled_catalogue_and_rewrites_prefixes(tmp_path: Path) -> None:
    out = tmp_path / "ntuples.json"
    result = CliRunner().invoke(
        main, ["catalog", "import", str(SHARED_AGC / "nanoaod_inputs.json"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == json.loads(default_catalog().read_text())

    https = "https://xrootd-local.unl.edu:1094//store/user/AGC/nanoAOD"
    eos = "root://eospublic.cern.ch//eos/opendata/cms/upload/agc/1.0.0/"
    moved = import_agc_catalog(SHARED_AGC / "nanoaod_inputs.json", https, eos)
    paths = [f.path for s in moved for f in s.files]
    assert all(p.startswith(eos) for p in paths)
    assert moved.nevts == 940_160_174
    with pytest.raises(CatalogError, match="go together"):
        import_agc_catalog(SHARED_AGC / "nanoaod_inputs.json", https, None)
