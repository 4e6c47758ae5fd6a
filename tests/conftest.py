"""Shared fixtures: small NanoAOD-like ROOT files, the reference data location, and an independent skim.

``write_nanoaod`` makes files with exactly the NanoAOD branch names and types the skim reads (plus a few it
must not return), with values piled up at every cut edge (pT exactly 30, |eta| exactly float32(2.1), b-tag
exactly 0.5, jets at 29.2 GeV that the +3 % JES variation lifts over 30 ...), so that a skim with a wrong
comparison, precision or threshold selects different events. ``skim_reference`` is the skim written again in
plain awkward/numpy from the issue text, sharing no code with ``queries/skim.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_NANOAOD = SHARED / "agc" / "samples" / "nanoAOD_2015_CMS_Open_Data_ttbar.root"

#: Branches the skim returns, as the issue lists them.
SKIM_BRANCHES = (
    ["run", "luminosityBlock", "event", "nJet", "nElectron", "nMuon"]
    + [f"Jet_{c}" for c in ("pt", "eta", "phi", "mass", "btagCSVV2", "qgl", "jetId")]
    + [f"Electron_{c}" for c in ("pt", "eta", "phi", "mass", "charge", "cutBased", "sip3d")]
    + [f"Muon_{c}" for c in ("pt", "eta", "phi", "mass", "charge", "tightId", "sip3d", "pfRelIso04_all")]
)


def _snap(rng: np.random.Generator, values: np.ndarray, edges: list[float], p: float) -> np.ndarray:
    """Replace a fraction ``p`` of ``values`` by cut-edge values (as float32, like NanoAOD stores them)."""
    out = values.copy()
    hit = rng.random(len(out)) < p
    out[hit] = rng.choice(np.array(edges, dtype=out.dtype), hit.sum())
    return out


def nanoaod_events(n: int, seed: int, *, leptons: bool = True) -> dict[str, Any]:
    """``n`` NanoAOD-like events (branches as for ``WritableTree.extend``); ``leptons=False``: none pass."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def collection(counts: np.ndarray, fields: dict[str, np.ndarray]) -> ak.Array:
        return ak.zip({k: ak.unflatten(v, counts) for k, v in fields.items()})

    n_jet = rng.integers(2, 9, n)
    n_ele = rng.integers(0, 3, n) if leptons else np.zeros(n, np.int64)
    n_mu = rng.integers(0, 3, n) if leptons else np.zeros(n, np.int64)
    n_pho = rng.integers(0, 2, n)
    nj, ne, nm = int(n_jet.sum()), int(n_ele.sum()), int(n_mu.sum())
    jet_pt = np.where(rng.random(nj) < 0.4, rng.uniform(20, 35, nj), rng.uniform(25, 150, nj)).astype(f32)
    jets = {
        "pt": _snap(rng, jet_pt, [25.0, 29.1, 29.2, 30.0], 0.1),
        "eta": _snap(rng, rng.uniform(-2.7, 2.7, nj).astype(f32), [2.4, -2.4], 0.05),
        "phi": rng.uniform(-np.pi, np.pi, nj).astype(f32),
        "mass": rng.uniform(2, 20, nj).astype(f32),
        "btagCSVV2": _snap(rng, rng.uniform(0, 1, nj).astype(f32), [0.5], 0.05),
        "qgl": rng.uniform(0, 1, nj).astype(f32),
        "jetId": rng.choice(np.array([0, 2, 6], np.int32), nj, p=[0.1, 0.1, 0.8]),
        "hadronFlavour": rng.choice(np.array([0, 4, 5], np.int32), nj),
    }
    electrons = {
        "pt": _snap(rng, rng.uniform(20, 60, ne).astype(f32), [30.0], 0.1),
        "eta": _snap(rng, rng.uniform(-2.4, 2.4, ne).astype(f32), [2.1, -2.1], 0.1),
        "phi": rng.uniform(-np.pi, np.pi, ne).astype(f32),
        "mass": np.full(ne, 0.000511, f32),
        "charge": rng.choice(np.array([-1, 1], np.int32), ne),
        "cutBased": rng.choice(np.array([0, 1, 2, 3, 4], np.int32), ne, p=[0.1, 0.1, 0.1, 0.1, 0.6]),
        "sip3d": _snap(rng, rng.uniform(0, 6, ne).astype(f32), [4.0], 0.1),
    }
    muons = {
        "pt": _snap(rng, rng.uniform(20, 60, nm).astype(f32), [30.0], 0.1),
        "eta": _snap(rng, rng.uniform(-2.4, 2.4, nm).astype(f32), [2.1, -2.1], 0.1),
        "phi": rng.uniform(-np.pi, np.pi, nm).astype(f32),
        "mass": np.full(nm, 0.1057, f32),
        "charge": rng.choice(np.array([-1, 1], np.int32), nm),
        "tightId": rng.random(nm) < 0.8,
        "sip3d": _snap(rng, rng.uniform(0, 6, nm).astype(f32), [4.0], 0.1),
        "pfRelIso04_all": _snap(rng, rng.uniform(0, 0.3, nm).astype(f32), [0.15], 0.1),
    }
    return {
        "run": np.full(n, 1, np.uint32),
        "luminosityBlock": (np.arange(n) // 100 + 1).astype(np.uint32),
        "event": (np.arange(n) + 1 + seed * 1_000_000).astype(np.uint64),
        "MET_pt": rng.uniform(0, 100, n).astype(f32),
        "Jet": collection(n_jet, jets),
        "Electron": collection(n_ele, electrons),
        "Muon": collection(n_mu, muons),
        "Photon": collection(n_pho, {"pt": rng.uniform(10, 50, int(n_pho.sum())).astype(f32)}),
    }


def write_nanoaod(path: Path, n: int, seed: int, *, leptons: bool = True) -> Path:
    """Write a NanoAOD-like ``Events`` TTree (mktree + extend: uproot >= 5.7 would otherwise write an RNTuple)."""
    branches = nanoaod_events(n, seed, leptons=leptons)
    types = {k: (v.type if isinstance(v, ak.Array) else v.dtype) for k, v in branches.items()}
    import uproot

    path.parent.mkdir(parents=True, exist_ok=True)
    with uproot.recreate(path) as f:
        f.mktree("Events", types, counter_name=lambda name: f"n{name}")
        if n:
            f["Events"].extend(branches)
    return path


def skim_reference(path: str | Path) -> ak.Array:
    """The skim of the issue in plain awkward, evaluated in the columns' float32 precision."""
    import uproot

    with uproot.open(path) as f:
        a = f["Events"].arrays(SKIM_BRANCHES)
    c = np.float32

    tight_electrons = (
        (a.Electron_pt > c(30)) & (abs(a.Electron_eta) < c(2.1)) & (a.Electron_cutBased == 4)
        & (a.Electron_sip3d < c(4))
    )
    tight_muons = (
        (a.Muon_pt > c(30)) & (abs(a.Muon_eta) < c(2.1)) & a.Muon_tightId & (a.Muon_sip3d < c(4))
        & (a.Muon_pfRelIso04_all < c(0.15))
    )
    jets = (a.Jet_pt > c(25)) & (abs(a.Jet_eta) < c(2.4)) & ((a.Jet_jetId & 4) != 0)
    tagged = jets & (a.Jet_btagCSVV2 > c(0.5))
    keep = (
        (ak.sum(tight_electrons, axis=1) + ak.sum(tight_muons, axis=1) == 1)
        & (ak.sum(jets, axis=1) >= 4)
        & (ak.sum(tagged, axis=1) >= 1)
    )
    return a[keep]


@pytest.fixture(scope="session")
def nanoaod_writer() -> Callable[..., Path]:
    """``write(path, n_events, seed, leptons=True) -> path``: a NanoAOD-like ROOT file."""
    return write_nanoaod


@pytest.fixture(scope="session")
def reference_skim() -> Callable[[str | Path], ak.Array]:
    """``skim(path) -> ak.Array``: the events (skim columns only) an independent computation keeps."""
    return skim_reference


@pytest.fixture(scope="session")
def skim_branches() -> tuple[str, ...]:
    """The columns the issue says the skim returns, in order."""
    return tuple(SKIM_BRANCHES)


@pytest.fixture(scope="session")
def real_nanoaod() -> Path:
    """The 200-event real 2015 NanoAOD file of ../shared; skips when absent."""
    if not REAL_NANOAOD.exists():
        pytest.skip(f"reference file {REAL_NANOAOD} not available")
    return REAL_NANOAOD


@pytest.fixture(scope="session")
def generated_delivery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalogue, delivery folder): all 9 samples generated (one 2000-event NanoAOD file each) and delivered
    with the local backend. Shared by the end-to-end and pipeline-equality tests."""
    from agc_sx.delivery.local import deliver_local
    from agc_sx.generate import generate

    base = tmp_path_factory.mktemp("generated")
    catalog = generate(base / "nanoaod", events_per_file=2000, files_per_sample=1, seed=11)
    report = deliver_local(catalog, base / "delivery", workers=1, quiet=True)
    assert not report.failures, report.failures
    return base / "nanoaod" / "ntuples.json", base / "delivery"
