"""End to end on generated NanoAOD: generate -> deliver (local) -> process with the BDT, and the other two ways
of running the same analysis: direct NanoAOD processing (``process --catalog``) must give identical histograms,
and ``--io-only`` must read exactly the needed columns and write no histograms.

The inputs come from the session fixture ``generated_delivery`` (conftest.py): 9 samples x 2000 events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uproot
from click.testing import CliRunner

from agc_sx.catalogue import load_catalog
from agc_sx.cli import main
from agc_sx.constants import (
    BTAG_VARIATIONS,
    LUMI_PB,
    REGIONS,
    TTBAR_ALTERNATIVES,
    WJETS_SCALE_VARIATIONS,
)
from agc_sx.manifest import Manifest
from agc_sx.processor import run_direct, run_processor
from agc_sx.schema import needed_columns

SINGLE_TOP = ("single_top_s_chan", "single_top_t_chan", "single_top_tW")


def family(region: str, process: str) -> set[str]:
    """The keys the issue's naming rule gives one nominal process in one region."""
    rest = ["", "_pt_scale_up", "_pt_res_up", *(f"_{v}" for v in BTAG_VARIATIONS)]
    if process == "wjets":
        rest += [f"_{v}" for v in WJETS_SCALE_VARIATIONS]
    return {f"{region}_{process}{r}" for r in rest}


def all_keys() -> set[str]:
    keys = {f"{region}_pseudodata" for region in REGIONS}
    for region in REGIONS:
        for process in ("ttbar", "wjets", *SINGLE_TOP):
            keys |= family(region, process)
        keys |= {f"{region}_ttbar_{v}" for v in TTBAR_ALTERNATIVES}
    return keys


@pytest.fixture(scope="module")
def processed(generated_delivery: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    _, delivery = generated_delivery
    out = tmp_path_factory.mktemp("e2e") / "histograms.root"
    return run_processor(delivery, output=out, ml=True, quiet=True)


def test_end_to_end_histograms_yields_and_metrics(generated_delivery: tuple[Path, Path], processed: Any) -> None:
    _, delivery = generated_delivery
    manifest = Manifest.load(delivery)
    hists, metrics = processed.histograms, processed.metrics
    region_events = metrics["events_per_sample_region"]
    assert len(all_keys()) == 124

    # every key follows the naming rule; every family with events is complete
    assert set(hists) <= all_keys()
    for region in REGIONS:
        assert f"{region}_pseudodata" in hists
        assert {f"{region}_ttbar_{v}" for v in TTBAR_ALTERNATIVES} <= set(hists)
        for process in ("ttbar", "wjets", *SINGLE_TOP):
            if region_events[f"{process}__nominal"][region] > 0:
                assert family(region, process) <= set(hists), (region, process)
        assert region_events["ttbar__nominal"][region] > 0
    with uproot.open(processed.output) as f:
        assert set(f.keys(cycle=False)) == set(hists)

    # sane yields: normalisation from the manifest, ttbar dominates 4j2b
    yields: dict[str, dict[str, float]] = {name: {} for name in manifest.samples}
    for name, rec in manifest.samples.items():
        for region in REGIONS:
            key = f"{region}_{rec.process}" + ("" if rec.variation == "nominal" else f"_{rec.variation}")
            total = hists[key].values(flow=True).sum() if key in hists else 0.0
            expected = region_events[name][region] * rec.xsec * LUMI_PB / rec.nevts_total
            assert total == pytest.approx(expected, rel=1e-9), key
            yields[name][region] = total
    assert yields["ttbar__nominal"]["4j2b"] > max(y["4j2b"] for n, y in yields.items() if not n.startswith("ttbar"))
    assert yields["ttbar__nominal"]["4j2b"] > 0.5 * sum(y["4j2b"] for n, y in yields.items()
                                                     if n.endswith("__nominal"))

    # BDT histograms for every 4j2b process/variation, carrying the same weights
    from agc_sx.ml import FEATURE_NAMES

    assert processed.ml_output.exists()
    suffixes = {k[len("4j2b_"):] for k in hists if k.startswith("4j2b_")}
    assert set(processed.ml_histograms) == {f"{f}_{rest}" for f in FEATURE_NAMES for rest in suffixes}

    # metrics.json agrees with the manifest
    on_disk = json.loads(processed.metrics_path.read_text())
    assert on_disk["pipeline"] == "deliver+process" and on_disk["mode"] == "analysis"
    assert on_disk["events_per_sample"] == {n: r.rows for n, r in sorted(manifest.samples.items())}
    assert on_disk["rows_per_sample"] == on_disk["events_per_sample"]
    assert on_disk["files"] == on_disk["chunks"] == sum(len(r.outputs) for r in manifest.samples.values())
    assert on_disk["events_per_region"] == {
        region: sum(r[region] for r in region_events.values()) for region in REGIONS}
    assert on_disk["columns_read"] == sorted(needed_columns(True))
    sizes = sum((delivery / o.file).stat().st_size for r in manifest.samples.values() for o in r.outputs)
    assert 0 < on_disk["bytes_read"] < sizes
    assert set(on_disk["stages"]) == {"plan", "process", "write"}
    assert all(s["wall_seconds"] >= 0 for s in on_disk["stages"].values())


def test_direct_equals_deliver_then_process(generated_delivery: tuple[Path, Path], processed: Any,
                                            tmp_path: Path) -> None:
    catalog_path, _ = generated_delivery
    direct = run_direct(catalog_path, output=tmp_path / "histograms.root", ml=True, quiet=True,
                        chunksize=700)  # chunk boundaries inside files: must not matter either
    for mine, theirs in ((direct.histograms, processed.histograms),
                         (direct.ml_histograms, processed.ml_histograms)):
        assert sorted(mine) == sorted(theirs)
        for key in mine:
            assert np.array_equal(mine[key].view(flow=True), theirs[key].view(flow=True)), key
    m = direct.metrics
    catalog = load_catalog(catalog_path)
    assert m["pipeline"] == "direct"
    assert m["events_per_sample"] == {s.name: s.nevts_total for s in sorted(catalog, key=lambda s: s.name)}
    assert m["events_after_skim_per_sample"] == processed.metrics["events_per_sample"]
    assert m["events_per_sample_region"] == processed.metrics["events_per_sample_region"]
    assert m["columns_read"] == sorted(needed_columns(True))
    assert m["bytes_read"] > 0 and m["chunks"] > len(catalog)


def _cli(args: list[str]) -> Any:
    result = CliRunner().invoke(main, ["process", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("source", ["delivery", "catalog"])
def test_io_only_reads_exactly_the_needed_columns(generated_delivery: tuple[Path, Path], source: str,
                                                  tmp_path: Path) -> None:
    catalog_path, delivery = generated_delivery
    out = tmp_path / "histograms.root"
    ml = source == "delivery"  # one source with the BDT inputs, one without
    args = [str(delivery)] if source == "delivery" else ["--catalog", str(catalog_path)]
    _cli([*args, "--io-only", "--output", str(out), *([] if ml else ["--no-ml"])])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no histograms of any kind
    assert metrics["mode"] == "io-only" and metrics["output"] is None and metrics["histograms"] == 0
    assert metrics["columns_read"] == sorted(needed_columns(ml))
    # only data buffers of those columns, plus one offsets buffer per collection (taken from pt)
    assert {b for b in metrics["buffers_read"] if b.endswith("-offsets")} == {
        "Jet_pt-offsets", "Electron_pt-offsets", "Muon_pt-offsets"}
    assert metrics["bytes_read"] > 0 and metrics["bytes_materialised"] > 0
    if source == "delivery":
        assert metrics["events_read"] == sum(r.rows for r in Manifest.load(delivery).samples.values())
    else:
        assert metrics["events_read"] == load_catalog(catalog_path).nevts
    assert {"plan", "process", "write"} <= set(metrics["stages"])


def test_dir_and_catalog_are_exclusive(generated_delivery: tuple[Path, Path], tmp_path: Path) -> None:
    catalog_path, delivery = generated_delivery
    out = tmp_path / "h.root"
    for args, needle in (([str(delivery), "--catalog", str(catalog_path)], "not both"),
                         ([], "give DIR"),
                         ([str(delivery), "--n-files", "1"], "--catalog")):
        result = CliRunner().invoke(main, ["process", *args, "--output", str(out), "--quiet"])
        assert result.exit_code != 0
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("agc-sx: error:") and needle in lines[0], result.output
    assert not out.exists()


def test_direct_on_real_nanoaod_reads_only_the_needed_branches(real_nanoaod: Path, tmp_path: Path) -> None:
    """Real 2015 NanoAOD has many more branches per collection (``Electron_deltaEtaSC`` comes first): only the
    needed ones may be touched, offsets included."""
    catalog = tmp_path / "ntuples.json"
    catalog.write_text(json.dumps({"ttbar": {"nominal": {"files": [{"path": str(real_nanoaod), "nevts": 200}]}}}))
    result = run_direct(catalog, output=tmp_path / "histograms.root", ml=False, quiet=True)
    m = result.metrics
    assert m["columns_read"] == sorted(needed_columns(False))
    assert {b.rsplit("-", 1)[0] for b in m["buffers_read"]} == set(needed_columns(False))
    assert m["events_read"] == 200 and m["events_after_skim"] <= 200
    # (bytes are not checked here: this small file keeps its baskets inside the TTree header)
    assert m["bytes_read"] > 0
