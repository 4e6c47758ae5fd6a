"""``agc-sx process``: every histogram against an independent plain-awkward computation, executor/chunking
invariance, reproducibility, refusals, metrics and the BDT hook.

The inputs are random skim-like events plus hand-made boundary events, written with ``ak.to_parquet`` into a
delivery folder with a real manifest. The reference (:func:`reference_histograms`) is written from the issue
text with ``ak.combinations`` / ``ak.argmax`` and ``hist`` fills; it shares nothing with the code under test
except the deterministic ``pt_res_up`` factors (tested on their own in test_selection.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import awkward as ak
import hist
import numpy as np
import pytest
import uproot
from click.testing import CliRunner

from agc_sx.cli import main
from agc_sx.manifest import Manifest, OutputFile, SampleRecord, sample_dirname
from agc_sx.processor import ProcessError, run_processor
from agc_sx.systematics import jer_factors
from agc_sx.utils import sha256_file

SHARED = Path(__file__).resolve().parents[3] / "shared"
OFFICIAL_MODELS = SHARED / "agc" / "models"

XSEC = {"ttbar": 729.84, "wjets": 15487.164, "single_top_s_chan": 3.2944, "single_top_t_chan": 234.7937,
        "single_top_tW": 75.842}
SAMPLES = [(p, "nominal") for p in XSEC] + [("ttbar", v) for v in ("scaledown", "scaleup", "ME_var", "PS_var")]
F32 = np.float32


# --------------------------------------------------------------------------------------------------------------
# inputs


def random_events(rng: np.random.Generator, n: int, event0: int) -> dict[str, Any]:
    """Skim-like events with every cut populated on both sides (pT-ordered jets, float32 kinematics)."""

    def jag(counts: np.ndarray, values: np.ndarray) -> ak.Array:
        return ak.unflatten(values, counts)

    nj, ne, nm = rng.integers(2, 9, n), rng.integers(0, 3, n), rng.integers(0, 3, n)
    J, E, M = int(nj.sum()), int(ne.sum()), int(nm.sum())
    cols: dict[str, Any] = {
        "run": np.ones(n, np.uint32), "luminosityBlock": rng.integers(1, 50, n).astype(np.uint32),
        "event": (np.arange(n) + event0).astype(np.uint64),
        "nJet": nj.astype(np.uint32), "nElectron": ne.astype(np.uint32), "nMuon": nm.astype(np.uint32),
        "Jet_pt": ak.sort(jag(nj, (25 + rng.exponential(45, J)).astype(F32)), axis=1, ascending=False),
        "Jet_eta": jag(nj, rng.uniform(-2.6, 2.6, J).astype(F32)),
        "Jet_phi": jag(nj, rng.uniform(-np.pi, np.pi, J).astype(F32)),
        "Jet_mass": jag(nj, rng.uniform(2, 25, J).astype(F32)),
        "Jet_btagCSVV2": jag(nj, np.where(rng.random(J) < 0.6, rng.uniform(0, 0.5, J), rng.uniform(0, 1, J))
                             .astype(F32)),
        "Jet_qgl": jag(nj, rng.uniform(0, 1, J).astype(F32)),
        "Jet_jetId": jag(nj, rng.choice([0, 2, 6, 6, 6, 6], J).astype(np.int32)),
    }
    for name, c, L in (("Electron", ne, E), ("Muon", nm, M)):
        cols[f"{name}_pt"] = jag(c, (20 + rng.exponential(30, L)).astype(F32))
        cols[f"{name}_eta"] = jag(c, rng.uniform(-2.5, 2.5, L).astype(F32))
        cols[f"{name}_phi"] = jag(c, rng.uniform(-np.pi, np.pi, L).astype(F32))
        cols[f"{name}_mass"] = jag(c, rng.uniform(0, 0.2, L).astype(F32))
        cols[f"{name}_charge"] = jag(c, rng.choice([-1, 1], L).astype(np.int32))
        cols[f"{name}_sip3d"] = jag(c, rng.exponential(2.5, L).astype(F32))
    cols["Electron_cutBased"] = jag(ne, rng.choice([0, 1, 2, 3, 4, 4, 4], E).astype(np.int32))
    cols["Muon_tightId"] = jag(nm, rng.random(M) < 0.8)
    cols["Muon_pfRelIso04_all"] = jag(nm, rng.exponential(0.1, M).astype(F32))
    return cols


GOOD_E = dict(pt=40.0, eta=0.3, phi=0.5, mass=0.0005, charge=-1, cutBased=4, sip3d=1.0)
GOOD_M = dict(pt=40.0, eta=-0.3, phi=-0.5, mass=0.105, charge=1, tightId=True, sip3d=1.0, pfRelIso04_all=0.05)


def jet(pt: float, eta: float = 0.0, phi: float = 0.0, mass: float = 8.0, btag: float = 0.1,
        jet_id: int = 6) -> dict[str, Any]:
    return dict(pt=pt, eta=eta, phi=phi, mass=mass, btagCSVV2=btag, qgl=0.5, jetId=jet_id)


#: (name, jets, electrons, muons): each one decides an event on one cut edge.
BOUNDARY: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]] = [
    # 3 jets nominally; the 29.5 GeV jet enters only under pt_scale_up (29.5 * 1.03 = 30.385)
    ("jet_pt_29.5", [jet(60, 0.1, 0.0, btag=0.9), jet(55, 0.5, 1.0, btag=0.8), jet(45, -0.5, 2.0),
                     jet(29.5, 1.0, -2.0)], [], [GOOD_M]),
    # exactly 4 jets, b-tag exactly 0.5 is not tagged: 4j1b, not 4j2b
    ("btag_0.5", [jet(90, btag=0.9), jet(70, 1.0, 1.0, btag=0.5), jet(50, -1.0, 2.0), jet(40, 0.2, -1.0)],
     [GOOD_E], []),
    # jetId 2 fails the tight-lepton-veto bit: 4 selected jets, 1 b-tag (4j1b) instead of 5 jets, 2 b-tags
    ("jet_id_2", [jet(120, btag=0.95), jet(100, 0.4, 1.5, btag=0.9, jet_id=2), jet(80, -0.4, -1.5),
                  jet(60, 1.2, 3.0), jet(35, -1.2, -3.0)], [GOOD_E], []),
    # an extra muon failing only sip3d does not count: exactly one lepton
    ("extra_mu_sip3d_4.5", [jet(100, 0.1, 0.1, btag=0.9), jet(90, 0.2, 2.1, btag=0.7), jet(80, 0.3, -2.0),
                            jet(70, 0.4, 1.0)], [GOOD_E], [{**GOOD_M, "sip3d": 4.5}]),
    # ... while one passing it makes two leptons: rejected
    ("extra_mu_sip3d_3.9", [jet(100, 0.1, 0.1, btag=0.9), jet(90, 0.2, 2.1, btag=0.7), jet(80, 0.3, -2.0),
                            jet(70, 0.4, 1.0)], [GOOD_E], [{**GOOD_M, "sip3d": 3.9}]),
    # the only lepton at |eta| = float32(2.1) is rejected (float32 comparison)
    ("lepton_eta_2.1", [jet(100, btag=0.9), jet(90, 0.2, 2.1), jet(80, 0.3, -2.0), jet(70, 0.4, 1.0)], [],
     [{**GOOD_M, "eta": 2.1}]),
    # a jet at |eta| = float32(2.4) is rejected: 3 jets left
    ("jet_eta_2.4", [jet(100, btag=0.9), jet(90, -2.4, 2.1), jet(80, 0.3, -2.0), jet(70, 0.4, 1.0)], [GOOD_E],
     []),
    # exact trijet tie: jets 2 and 3 share pT and phi (same vector-sum pT), opposite eta (different mass)
    ("trijet_tie", [jet(100, 0.5, 0.0, btag=0.9), jet(90, 0.0, 0.3), jet(40, 1.0, 0.1, btag=0.8),
                    jet(40, -1.0, 0.1, btag=0.8)], [GOOD_E], []),
    # a 900 GeV jet: the btag_var_0_down weight is negative
    ("negative_weight", [jet(900, 0.1, 0.0, btag=0.9), jet(200, 0.5, 2.5, btag=0.9), jet(100, -0.5, -2.0),
                         jet(50, 1.5, 1.0)], [], [GOOD_M]),
    # pt exactly 30 fails pt > 30 nominally (4 jets otherwise)
    ("jet_pt_30", [jet(100, btag=0.9), jet(90, 0.2, 2.1, btag=0.9), jet(80, 0.3, -2.0), jet(30, 0.4, 1.0)],
     [GOOD_E], []),
]

JET_DTYPES = dict(pt=F32, eta=F32, phi=F32, mass=F32, btagCSVV2=F32, qgl=F32, jetId=np.int32)
LEP_DTYPES = dict(pt=F32, eta=F32, phi=F32, mass=F32, charge=np.int32, cutBased=np.int32, tightId=bool,
                  sip3d=F32, pfRelIso04_all=F32)
ELE_FIELDS = ("pt", "eta", "phi", "mass", "charge", "cutBased", "sip3d")
MU_FIELDS = ("pt", "eta", "phi", "mass", "charge", "tightId", "sip3d", "pfRelIso04_all")


def boundary_events(event0: int) -> dict[str, Any]:
    """The :data:`BOUNDARY` events as skim columns with NanoAOD dtypes."""
    n = len(BOUNDARY)
    cols: dict[str, Any] = {"run": np.ones(n, np.uint32), "luminosityBlock": np.full(n, 7, np.uint32),
                            "event": (np.arange(n) + event0).astype(np.uint64)}
    for coll, index, fields, dtypes in (("Jet", 1, tuple(JET_DTYPES), JET_DTYPES),
                                        ("Electron", 2, ELE_FIELDS, LEP_DTYPES),
                                        ("Muon", 3, MU_FIELDS, LEP_DTYPES)):
        counts = np.array([len(b[index]) for b in BOUNDARY])  # type: ignore[arg-type]
        cols[f"n{coll}"] = counts.astype(np.uint32)
        for f in fields:
            flat = np.array([obj[f] for b in BOUNDARY for obj in b[index]], dtype=dtypes[f])  # type: ignore[attr-defined]
            cols[f"{coll}_{f}"] = ak.unflatten(flat, counts)
    return cols


def concat(parts: list[dict[str, Any]]) -> ak.Array:
    keys = list(parts[0])
    return ak.Array({k: ak.concatenate([ak.Array(p[k]) if not isinstance(p[k], np.ndarray) else p[k]
                                        for p in parts]) for k in keys})


def write_sample(base: Path, manifest: Manifest, process: str, variation: str, arrays: list[ak.Array],
                 nevts_factor: int = 3) -> None:
    record = SampleRecord(process, variation, XSEC[process], "test", inputs=[])
    for i, arr in enumerate(arrays):
        rel = f"{sample_dirname(process, variation)}/part{i}.parquet"
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ak.to_parquet(arr, path)
        nevts = len(arr) * nevts_factor + 11
        record.inputs.append({"path": f"root://x/{process}_{variation}_{i}.root", "nevts": nevts})
        record.set_output(OutputFile(rel, f"root://x/{process}_{variation}_{i}.root", nevts, len(arr),
                                     path.stat().st_size, sha256_file(path), "q"))
    record.finish()
    manifest.samples[record.name] = record


def make_delivery(base: Path, seed: int = 7, n: int = 300) -> Path:
    rng = np.random.default_rng(seed)
    manifest = Manifest.open_or_create(base)
    event0 = 0
    for process, variation in SAMPLES:
        files = []
        for i in range(2):
            parts = [random_events(rng, n + 37 * i, event0)]
            event0 += n + 37 * i
            if variation == "nominal" and process in ("ttbar", "wjets") and i == 1:
                parts.append(boundary_events(event0))
                event0 += len(BOUNDARY)
            files.append(concat(parts))
        write_sample(base, manifest, process, variation, files)
    manifest.save()
    return base


@pytest.fixture(scope="module")
def delivery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_delivery(tmp_path_factory.mktemp("delivery"))


@pytest.fixture(scope="module")
def iterative_run(delivery: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("out_iterative") / "histograms.root"
    return run_processor(delivery, output=out, ml=False, quiet=True)


# --------------------------------------------------------------------------------------------------------------
# the independent reference


def _axis() -> hist.Hist:
    return hist.Hist.new.Reg(25, 50, 550, name="observable").Weight()


def reference_histograms(base: Path) -> dict[str, hist.Hist]:
    """AGC v2 histograms recomputed in plain awkward from the parquet files and the manifest."""
    doc = json.loads((base / "manifest.json").read_text())
    hists: dict[tuple[str, str, str], hist.Hist] = {}

    def fill(region: str, process: str, variation: str, values: Any, weight: Any) -> None:
        h = hists.setdefault((region, process, variation), _axis())
        h.fill(observable=np.asarray(values, dtype=np.float64), weight=weight)

    for rec in doc["samples"].values():
        process, variation = rec["process"], rec["variation"]
        nevts = sum(o["nevts_input"] for o in rec["outputs"])
        weight = rec["xsec"] * 3378 / nevts
        ev = ak.concatenate([ak.from_parquet(base / o["file"]) for o in sorted(rec["outputs"],
                                                                              key=lambda o: o["file"])])
        ele_ok = ((ev.Electron_pt > 30) & (abs(ev.Electron_eta) < 2.1) & (ev.Electron_cutBased == 4)
                  & (ev.Electron_sip3d < 4))
        mu_ok = ((ev.Muon_pt > 30) & (abs(ev.Muon_eta) < 2.1) & ev.Muon_tightId & (ev.Muon_sip3d < 4)
                 & (ev.Muon_pfRelIso04_all < 0.15))
        one_lepton = (ak.sum(ele_ok, axis=1) + ak.sum(mu_ok, axis=1)) == 1
        pts = {"nominal": ev.Jet_pt}
        if variation == "nominal":
            pts["pt_scale_up"] = ev.Jet_pt * np.float64(1.03)
            counts = ak.to_numpy(ak.num(ev.Jet_pt))
            offsets = np.concatenate([[0], np.cumsum(counts)])
            factors = jer_factors(ak.to_numpy(ev.run), ak.to_numpy(ev.luminosityBlock), ak.to_numpy(ev.event),
                                  offsets)
            pts["pt_res_up"] = ev.Jet_pt * ak.unflatten(factors, counts)
        for jet_var, pt in pts.items():
            jets = ak.zip({"pt": pt, "eta": ev.Jet_eta, "phi": ev.Jet_phi, "mass": ev.Jet_mass,
                           "btag": ev.Jet_btagCSVV2, "id": ev.Jet_jetId})
            jets = jets[(jets.pt > 30) & (abs(jets.eta) < 2.4) & ((jets.id & 4) != 0)]
            n_b = ak.sum(jets.btag > 0.5, axis=1)
            base_sel = one_lepton & (ak.num(jets) >= 4)
            name = variation if jet_var == "nominal" else jet_var
            for region, in_region in (("4j1b", base_sel & (n_b == 1)), ("4j2b", base_sel & (n_b >= 2))):
                rj = jets[in_region]
                if region == "4j1b":
                    obs = ak.sum(rj.pt, axis=1)
                else:
                    phi = ak.values_astype(rj.phi, np.float64)
                    eta = ak.values_astype(rj.eta, np.float64)
                    mass = ak.values_astype(rj.mass, np.float64)
                    px, py, pz = rj.pt * np.cos(phi), rj.pt * np.sin(phi), rj.pt * np.sinh(eta)
                    cart = ak.zip({"px": px, "py": py, "pz": pz, "e": np.sqrt(px**2 + py**2 + pz**2 + mass**2),
                                   "tag": rj.btag > 0.5})
                    tri = ak.combinations(cart, 3, fields=["a", "b", "c"])
                    tri = tri[tri.a.tag | tri.b.tag | tri.c.tag]
                    sx = tri.a.px + tri.b.px + tri.c.px
                    sy = tri.a.py + tri.b.py + tri.c.py
                    sz = tri.a.pz + tri.b.pz + tri.c.pz
                    se = tri.a.e + tri.b.e + tri.c.e
                    best = ak.argmax(np.sqrt(sx**2 + sy**2), axis=1, keepdims=True)
                    obs = ak.flatten(np.sqrt(se**2 - (sx**2 + sy**2 + sz**2))[best])
                fill(region, process, name, obs, weight)
                if jet_var == "nominal" and variation == "nominal":
                    for i in range(4):
                        # as the AGC: a float64 [+0.075, -0.075] times the float32 pT / 50
                        scaled = ak.to_numpy(rj.pt[:, i] / 50) if len(rj) else np.zeros(0, F32)
                        up_down = 1 + np.array([0.075, -0.075]) * scaled[:, None]
                        fill(region, process, f"btag_var_{i}_up", obs, weight * up_down[:, 0])
                        fill(region, process, f"btag_var_{i}_down", obs, weight * up_down[:, 1])
                    if process == "wjets":
                        fill(region, process, "scale_var_up", obs, weight * 1.025)
                        fill(region, process, "scale_var_down", obs, weight * 0.975)
    out = {}
    for (region, process, variation), h in hists.items():
        if h.values().sum() != 0:
            out[f"{region}_{process}" if variation == "nominal" else f"{region}_{process}_{variation}"] = h
    for region in ("4j1b", "4j2b"):
        out[f"{region}_pseudodata"] = ((hists[(region, "ttbar", "ME_var")] + hists[(region, "ttbar", "PS_var")])
                                       / 2 + hists[(region, "wjets", "nominal")])
    return out


def assert_same(a: dict[str, hist.Hist], b: dict[str, hist.Hist], rtol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        va, vb = a[key].view(flow=True), b[key].view(flow=True)
        if rtol:
            np.testing.assert_allclose(va["value"], vb["value"], rtol=rtol, atol=0, err_msg=key)
            np.testing.assert_allclose(va["variance"], vb["variance"], rtol=rtol, atol=0, err_msg=key)
        else:
            assert np.array_equal(va["value"], vb["value"]), key
            assert np.array_equal(va["variance"], vb["variance"]), key


# --------------------------------------------------------------------------------------------------------------
# tests


def test_every_histogram_matches_independent_reference(delivery: Path, iterative_run: Any) -> None:
    reference = reference_histograms(delivery)
    assert len(iterative_run.histograms) == 124
    assert_same(iterative_run.histograms, reference, rtol=1e-12)
    # what was written is what was returned, as TH1D with sumw2
    with uproot.open(iterative_run.output) as f:
        keys = set(f.keys(cycle=False))
        assert keys == set(reference)
        th1 = f["4j2b_ttbar_btag_var_0_down"]
        assert th1.classname == "TH1D"
        np.testing.assert_array_equal(th1.values(flow=True),
                                      iterative_run.histograms["4j2b_ttbar_btag_var_0_down"].values(flow=True))
        np.testing.assert_array_equal(th1.variances(flow=True),
                                      iterative_run.histograms["4j2b_ttbar_btag_var_0_down"].variances(flow=True))


def test_boundary_events_decide_as_specified(delivery: Path) -> None:
    """Each boundary event alone, through the processor, lands where its construction says."""
    base = delivery.parent / "boundary_only"
    manifest = Manifest.open_or_create(base)
    write_sample(base, manifest, "ttbar", "nominal", [concat([boundary_events(0)])])
    manifest.save()
    result = run_processor(base, output=base / "h.root", ml=False, quiet=True)
    per_region = result.metrics["events_per_region"]
    names = [b[0] for b in BOUNDARY]
    expect_1b = {"btag_0.5", "jet_id_2"}
    expect_2b = {"extra_mu_sip3d_4.5", "trijet_tie", "negative_weight"}
    assert per_region == {"4j1b": len(expect_1b), "4j2b": len(expect_2b)}
    assert set(names) >= expect_1b | expect_2b
    hists = result.histograms
    weight = 729.84 * 3378 / (len(BOUNDARY) * 3 + 11)
    # jet at 29.5 GeV: only pt_scale_up sees a fourth jet (and then 2 b-tags, as for the 900 GeV jet
    # event; the jet at exactly 30 GeV passes too once scaled)
    assert hists["4j2b_ttbar_pt_scale_up"].values(flow=True).sum() == pytest.approx(5 * weight, rel=1e-12)
    # the negative btag_var_0_down weight (1 - 0.075 * 900 / 50 < 0) is kept, not clipped
    assert hists["4j2b_ttbar_btag_var_0_down"].values(flow=True).min() < 0


def test_executors_and_chunkings_identical(delivery: Path, iterative_run: Any, tmp_path: Path) -> None:
    from distributed import LocalCluster

    futures = run_processor(delivery, output=tmp_path / "f" / "h.root", executor="futures", workers=2,
                            ml=False, quiet=True)
    assert_same(futures.histograms, iterative_run.histograms)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        dask = run_processor(delivery, output=tmp_path / "d" / "h.root", executor="dask",
                             scheduler=cluster.scheduler_address, ml=False, quiet=True)
    assert_same(dask.histograms, iterative_run.histograms)
    chunked = run_processor(delivery, output=tmp_path / "c" / "h.root", chunksize=150, ml=False, quiet=True)
    assert chunked.metrics["chunks"] >= 2 * iterative_run.metrics["chunks"]
    assert_same(chunked.histograms, iterative_run.histograms)  # exact sums: chunking cannot change a bit


def test_pt_res_up_reproducible_run_to_run(delivery: Path, iterative_run: Any, tmp_path: Path) -> None:
    again = run_processor(delivery, output=tmp_path / "h.root", ml=False, quiet=True)
    for key in ("4j1b_ttbar_pt_res_up", "4j2b_wjets_pt_res_up"):
        assert np.array_equal(again.histograms[key].view(flow=True), iterative_run.histograms[key].view(flow=True))
    # and it is a real variation: it differs from nominal
    assert not np.array_equal(iterative_run.histograms["4j2b_ttbar_pt_res_up"].values(),
                              iterative_run.histograms["4j2b_ttbar"].values())


def test_metrics_json(iterative_run: Any) -> None:
    metrics = json.loads(iterative_run.metrics_path.read_text())
    assert iterative_run.metrics_path.parent == iterative_run.output.parent
    assert metrics["executor"] == "iterative" and metrics["workers"] == 1
    assert sum(metrics["events_per_sample"].values()) == metrics["events_read"] > 0
    assert metrics["events_per_sample"]["ttbar__nominal"] == 2 * 300 + 37 + len(BOUNDARY)
    assert set(metrics["events_per_region"]) == {"4j1b", "4j2b"}
    assert metrics["bytes_read"] > 0 and metrics["wall_seconds"] > 0 and metrics["event_rate_hz"] > 0
    assert metrics["versions"]["coffea"]


# --- refusals -------------------------------------------------------------------------------------------------


def _copy_delivery(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, ["process", *args, "--no-ml", "--quiet"])


def _refused(result: Any, out: Path, needle: str) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("agc-sx: error:") and needle in lines[0], result.output
    assert not out.exists()
    assert not list(out.parent.glob("*.root*")) if out.parent.exists() else True


def test_refuses_folder_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o" / "histograms.root"
    _refused(_cli([str(tmp_path / "empty"), "--output", str(out)]), out, "manifest.json")


def test_refuses_incomplete_sample_unless_allowed(delivery: Path, tmp_path: Path) -> None:
    base = _copy_delivery(delivery, tmp_path / "d")
    manifest = Manifest.load(base)
    rec = manifest.samples["wjets__nominal"]
    rec.inputs.append({"path": "root://x/never_delivered.root", "nevts": 1000})
    rec.finish()
    manifest.save()
    out = tmp_path / "o" / "histograms.root"
    _refused(_cli([str(base), "--output", str(out)]), out, "wjets__nominal is incomplete")
    ok = _cli([str(base), "--output", str(out), "--allow-incomplete"])
    assert ok.exit_code == 0, ok.output
    assert out.exists()
    # the partial input is said, and recorded with the result
    assert "--allow-incomplete: 1 sample(s)" in ok.stderr and "wjets__nominal: 2 of 3 files" in ok.stderr
    metrics = json.loads((out.parent / "metrics.json").read_text())
    assert metrics["allow_incomplete"] is True
    assert metrics["incomplete_samples"] == {"wjets__nominal": "2 of 3 files delivered"}


def test_refuses_missing_column(delivery: Path, tmp_path: Path) -> None:
    base = _copy_delivery(delivery, tmp_path / "d")
    _rewrite_file(base, lambda arr: arr[[f for f in arr.fields if f != "Muon_sip3d"]])
    out = tmp_path / "o" / "histograms.root"
    _refused(_cli([str(base), "--output", str(out)]), out, "missing column Muon_sip3d")


def test_refuses_wrong_column_type(delivery: Path, tmp_path: Path) -> None:
    base = _copy_delivery(delivery, tmp_path / "d")
    _rewrite_file(base, lambda arr: ak.with_field(arr, ak.values_astype(arr.Jet_eta, np.float64), "Jet_eta"))
    out = tmp_path / "o" / "histograms.root"
    _refused(_cli([str(base), "--output", str(out)]), out, "column Jet_eta")


def test_refuses_checksum_mismatch(delivery: Path, tmp_path: Path) -> None:
    base = _copy_delivery(delivery, tmp_path / "d")
    target = sorted(base.glob("ttbar__nominal/*.parquet"))[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    out = tmp_path / "o" / "histograms.root"
    _refused(_cli([str(base), "--output", str(out)]), out, "checksum mismatch")


def _rewrite_file(base: Path, change: Any) -> None:
    """Rewrite one delivered file and update its manifest record (so only the content is wrong)."""
    manifest = Manifest.load(base)
    rec = manifest.samples["single_top_tW__nominal"]
    out = rec.outputs[0]
    path = base / out.file
    ak.to_parquet(change(ak.from_parquet(path)), path)
    rec.set_output(OutputFile(out.file, out.input, out.nevts_input, out.rows, path.stat().st_size,
                              sha256_file(path), out.query_sha256))
    manifest.save()


def test_refuses_rows_that_differ_from_the_manifest(delivery: Path, tmp_path: Path) -> None:
    base = _copy_delivery(delivery, tmp_path / "d")
    manifest = Manifest.load(base)
    rec = manifest.samples["single_top_tW__nominal"]
    out = rec.outputs[0]
    rec.set_output(OutputFile(out.file, out.input, out.nevts_input, out.rows + 5, out.bytes, out.sha256,
                              out.query_sha256))
    manifest.save()
    target = tmp_path / "o" / "histograms.root"
    _refused(_cli([str(base), "--output", str(target)]), target, f"the manifest says {out.rows + 5}")


def test_bad_options_are_refused(delivery: Path, tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="--scheduler"):
        run_processor(delivery, output=tmp_path / "h.root", scheduler="tcp://x:1", ml=False)
    assert not (tmp_path / "h.root").exists()


# --- the BDT hook ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_run(delivery: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not (OFFICIAL_MODELS / "model_even.json").exists():
        pytest.skip("official AGC models not available")
    out = tmp_path_factory.mktemp("out_ml") / "histograms.root"
    return run_processor(delivery, output=out, ml=True, models_dir=OFFICIAL_MODELS, quiet=True)


def test_ml_histograms_present_for_every_variation(ml_run: Any, iterative_run: Any) -> None:
    from agc_sx.ml import FEATURE_NAMES

    assert ml_run.ml_output.exists()
    # the region histograms do not depend on the BDT
    assert_same(ml_run.histograms, iterative_run.histograms)
    variations = {k[len("4j2b_"):] for k in iterative_run.histograms if k.startswith("4j2b_")}
    with uproot.open(ml_run.ml_output) as f:
        keys = set(f.keys(cycle=False))
    expected = {f"{feature}_{rest}" for feature in FEATURE_NAMES for rest in variations}
    assert keys == expected == set(ml_run.ml_histograms)
    # ML histograms carry the 4j2b weights: same total per (process, variation) as the m_bjj histogram
    for rest in variations:
        total = iterative_run.histograms[f"4j2b_{rest}"].values(flow=True).sum()
        for feature in FEATURE_NAMES:
            assert ml_run.ml_histograms[f"{feature}_{rest}"].values(flow=True).sum() == pytest.approx(total,
                                                                                                     rel=1e-9)


def test_no_ml_gives_no_ml_file(delivery: Path, tmp_path: Path) -> None:
    out = tmp_path / "histograms.root"
    result = CliRunner().invoke(main, ["process", str(delivery), "--output", str(out), "--no-ml", "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.exists() and (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "histograms_ml.root").exists()


# --------------------------------------------------------------------------------------------------------------
# non-finite values


def _poison(arr: ak.Array, rng: np.random.Generator, spoil: bool) -> ak.Array:
    """Put +inf / -inf / NaN into every float column of a few objects (``spoil``), or instead make the same
    objects fail the selection the plain way (``spoil=False``: jetId 0, cutBased 0, tightId False).

    Non-finite kinematics are documented to fail the object selection, so both must give the same histograms.
    """
    out = {f: arr[f] for f in arr.fields}
    specials = np.array([np.inf, -np.inf, np.nan], dtype=F32)
    for coll, fields, veto in (
        ("Jet", ("pt", "eta", "phi", "mass", "btagCSVV2"), ("jetId", 0)),
        ("Electron", ("pt", "sip3d"), ("cutBased", 0)),
        ("Muon", ("pt", "sip3d", "pfRelIso04_all"), ("tightId", False)),
    ):
        counts = ak.num(arr[f"{coll}_pt"])
        n = int(ak.sum(counts))
        hit = rng.random(n) < 0.15
        which = rng.integers(0, len(fields), n)
        value = rng.choice(specials, n)  # drawn in both modes, so that both spoil the same objects
        for i, name in enumerate(fields):
            flat = ak.to_numpy(ak.flatten(out[f"{coll}_{name}"])).copy()
            mine = hit & (which == i)
            if spoil:
                flat[mine] = value[mine]
            out[f"{coll}_{name}"] = ak.unflatten(flat, counts)
        if not spoil:
            flat = ak.to_numpy(ak.flatten(out[f"{coll}_{veto[0]}"])).copy()
            flat[hit] = veto[1]
            out[f"{coll}_{veto[0]}"] = ak.unflatten(flat, counts)
    return ak.zip(out, depth_limit=1)


@pytest.mark.parametrize("ml", [False, True])
def test_non_finite_values_fail_the_object_selection(delivery: Path, tmp_path: Path, ml: bool) -> None:
    results = {}
    for spoil in (True, False):
        base = _copy_delivery(delivery, tmp_path / f"d{spoil}")
        manifest = Manifest.load(base)
        for rec in manifest:
            for i, out in enumerate(rec.outputs):
                path = base / out.file
                arr = _poison(ak.from_parquet(path), np.random.default_rng(i + len(rec.name)), spoil)
                ak.to_parquet(arr, path)
                rec.set_output(OutputFile(out.file, out.input, out.nevts_input, out.rows, path.stat().st_size,
                                          sha256_file(path), out.query_sha256))
        manifest.save()
        results[spoil] = run_processor(base, output=tmp_path / f"h{spoil}" / "histograms.root", ml=ml, quiet=True)
    poisoned, vetoed = results[True], results[False]
    assert_same(poisoned.histograms, vetoed.histograms)
    for key, h in (poisoned.histograms | poisoned.ml_histograms).items():
        assert np.isfinite(h.values(flow=True)).all() and np.isfinite(h.variances(flow=True)).all(), key
        if "btag_var" not in key:  # 1 - 0.075 pT/50 is negative above 667 GeV: the AGC's own definition
            assert (h.values(flow=True) >= 0).all(), key
    if ml:
        assert_same(poisoned.ml_histograms, vetoed.ml_histograms)


# --------------------------------------------------------------------------------------------------------------
# outputs replaced as a set


def test_outputs_are_replaced_as_one_set(delivery: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from agc_sx import utils

    out = tmp_path / "histograms.root"
    run_processor(delivery, output=out, ml=True, quiet=True)  # set A, with the BDT file
    assert (tmp_path / "histograms_ml.root").exists()

    # killed while writing the new set (before it is committed): the old set stays whole, leftovers go
    (tmp_path / ".agc-sx-set.histograms.root.x1.part").write_bytes(b"half a file")
    real_replace = os.replace

    def crash_after_first(src: Any, dst: Any) -> None:  # the new histograms.root is in place, then the crash
        if Path(dst).name == "metrics.json":
            raise OSError("the machine went down")
        real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", crash_after_first)
    with pytest.raises(OSError, match="went down"):
        run_processor(delivery, output=out, ml=False, quiet=True)  # set B, no BDT: dies mid-commit
    monkeypatch.undo()
    assert (tmp_path / utils.SET_JOURNAL).exists()
    utils.recover_output_set(tmp_path)  # what the next run does first
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["ml_output"] is None and not (tmp_path / "histograms_ml.root").exists()  # all of set B
    assert sorted(p.name for p in tmp_path.iterdir()) == ["histograms.root", "metrics.json"]

    # killed before the commit: only temporary files were written, and the next run removes them
    (tmp_path / ".agc-sx-set.metrics.json.x2.part").write_bytes(b"{")
    assert _cli([str(delivery), "--output", str(out)]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["histograms.root", "metrics.json"]


def test_all_cores_by_default_with_identical_results(delivery: Path, iterative_run: Any, tmp_path: Path) -> None:
    from agc_sx.cli._group import ALL_CORES

    out = tmp_path / "histograms.root"
    result = CliRunner().invoke(main, ["process", str(delivery), "--output", str(out), "--no-ml", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["executor"], metrics["workers"]) == ("futures", ALL_CORES)
    with uproot.open(out) as f:
        for key, h in iterative_run.histograms.items():
            np.testing.assert_array_equal(f[key].values(flow=True), h.values(flow=True), err_msg=key)
