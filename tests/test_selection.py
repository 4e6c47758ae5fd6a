"""Selection, observables and systematics on hand-made events, against plain awkward/numpy written here."""

from __future__ import annotations

from typing import Any

import awkward as ak
import numpy as np
import pytest

from agc_sx import constants as C
from agc_sx.selection import (
    NO_REGION,
    REGION_4J1B,
    REGION_4J2B,
    Collection,
    electron_mask,
    jet_mask,
    jet_mask_fixed,
    muon_mask,
    select_variations,
    selected_jets,
)
from agc_sx.systematics import (
    _mix,
    btag_weight_factors,
    jer_factors,
    jet_pt_variations,
    pt_scale_up,
    splitmix64,
)

F32 = np.float32


def jets_of(events: list[list[tuple[float, float, float, float, float, int]]]) -> Collection:
    """(pt, eta, phi, mass, btag, jetId) per jet, float32 / int32 as in NanoAOD."""
    counts = np.array([len(e) for e in events])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = [j for e in events for j in e]
    names = ("pt", "eta", "phi", "mass", "btagCSVV2", "jetId")
    fields = {n: np.array([j[i] for j in flat], dtype=np.int32 if n == "jetId" else F32) for i, n in enumerate(names)}
    return Collection(offsets, fields)


def event_ids(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run, luminosityBlock, event) of n distinct events."""
    return np.ones(n, np.uint32), (np.arange(n) % 7 + 1).astype(np.uint32), np.arange(n, dtype=np.uint64)


def jagged(jets: Collection, pt: np.ndarray | None = None) -> ak.Array:
    """The collection as a plain awkward record array, with ``pt`` replaced by a varied column if given."""
    cols = {k: (pt if k == "pt" and pt is not None else jets[k]) for k in jets.fields}
    return ak.unflatten(ak.zip(cols), np.diff(jets.offsets))


def reference_selection(jets: Collection, pt: np.ndarray, lepton_ok: np.ndarray) -> dict[str, Any]:
    """AGC v2 jet/event selection, regions, HT, trijet m_bjj and leading pTs for the pT column ``pt``, in
    plain awkward written here (ak.sum, ak.combinations + ak.argmax, float64 Cartesian four-vectors)."""
    arr = jagged(jets, pt)
    good = (arr.pt > C.JET_PT_MIN) & (abs(arr.eta) < C.JET_ABS_ETA_MAX) & ((arr.jetId & C.JET_ID_MASK) != 0)
    sel = arr[good]
    n_jets, n_b = ak.to_numpy(ak.num(sel)), ak.to_numpy(ak.sum(sel.btagCSVV2 > C.BTAG_WP, axis=1))
    passed = lepton_ok & (n_jets >= C.MIN_JETS) & (n_b >= 1)
    region = np.where(passed, np.where(n_b == 1, REGION_4J1B, REGION_4J2B), NO_REGION)
    ht = ak.to_numpy(ak.sum(sel.pt, axis=1))  # in the column's dtype, like the AGC
    # trijet: the first candidate with a tagged jet and the largest vector-sum pT
    in_2b = region == REGION_4J2B
    c = sel[in_2b]
    p, phi, eta, m = (ak.values_astype(c[k], np.float64) for k in ("pt", "phi", "eta", "mass"))
    v = ak.zip({"x": p * np.cos(phi), "y": p * np.sin(phi), "z": p * np.sinh(eta), "m": m,
                "b": c.btagCSVV2 > C.BTAG_WP})
    v = ak.with_field(v, np.sqrt(v.x**2 + v.y**2 + v.z**2 + v.m**2), "e")
    t = ak.combinations(v, 3, fields=["a", "b", "c"])
    t = t[t.a.b | t.b.b | t.c.b]
    x, y, z, e = (t.a[k] + t.b[k] + t.c[k] for k in ("x", "y", "z", "e"))
    best = ak.argmax(np.sqrt(x**2 + y**2), axis=1, keepdims=True)
    mbjj = np.full(len(region), np.nan)
    mbjj[in_2b] = ak.to_numpy(ak.flatten(np.sqrt(e**2 - (x**2 + y**2 + z**2))[best]))
    lead = ak.to_numpy(ak.fill_none(ak.pad_none(sel.pt, C.MIN_JETS, clip=True), np.nan))
    return {"region": region, "ht": ht, "mbjj": mbjj, "lead_pt": lead, "jets": sel,
            "trijet": (x, y, z, e)}


def test_lepton_cuts_in_float32() -> None:
    eta = np.array([2.1, np.nextafter(F32(2.1), F32(0)), -2.1], dtype=F32)
    ele = Collection(np.array([0, 3]), {"pt": np.full(3, 40, F32), "eta": eta, "cutBased": np.full(3, 4, np.int32),
                                        "sip3d": np.ones(3, F32)})
    # float32(2.1) = 2.0999999 is rejected, as numpy compares float32 columns with Python floats in float32
    assert electron_mask(ele).tolist() == [False, True, False]
    mu = Collection(np.array([0, 4]), {"pt": np.array([40, 40, 40, 30], F32), "eta": np.zeros(4, F32),
                                       "tightId": np.array([True, True, False, True]),
                                       "sip3d": np.array([1, 4, 1, 1], F32), "pfRelIso04_all": np.zeros(4, F32)})
    assert muon_mask(mu).tolist() == [True, False, False, False]


def test_regions_boundaries_and_jes() -> None:
    jets = jets_of([
        [(60, 0, 0, 5, 0.9, 6), (55, 0, 1, 5, 0.8, 6), (45, 0, 2, 5, 0.1, 6), (29.5, 0, 3, 5, 0.1, 6)],  # 29.5
        [(60, 0, 0, 5, 0.9, 6), (55, 0, 1, 5, 0.5, 6), (45, 0, 2, 5, 0.1, 6), (40, 0, 3, 5, 0.1, 6)],  # 0.5
        [(60, 0, 0, 5, 0.9, 6), (55, 0, 1, 5, 0.9, 2), (45, 0, 2, 5, 0.1, 6), (40, 0, 3, 5, 0.1, 6),
         (35, 0, 3, 5, 0.1, 6)],  # jetId 2
        [(60, 0, 0, 5, 0.9, 6), (55, 2.4, 1, 5, 0.9, 6), (45, 0, 2, 5, 0.1, 6), (40, 0, 3, 5, 0.1, 6)],  # eta 2.4
        [(60, 0, 0, 5, 0.9, 6), (55, 0, 1, 5, 0.9, 6), (45, 0, 2, 5, 0.1, 6), (40, 0, 3, 5, 0.1, 6)],  # no lepton
    ])
    lepton_ok = np.array([True, True, True, True, False])
    sel = select_variations(jets, lepton_ok, *event_ids(5), variations=True)
    assert sel.region[0].tolist() == [NO_REGION, REGION_4J1B, REGION_4J1B, NO_REGION, NO_REGION]
    scaled_pt = pt_scale_up(jets["pt"])
    assert scaled_pt.dtype == np.float64
    # variation 1 is pt_scale_up: the 29.5 GeV jet (x 1.03) passes and makes event 0 a 4j2b event
    assert sel.region[1].tolist() == [REGION_4J2B, REGION_4J1B, REGION_4J1B, NO_REGION, NO_REGION]
    assert np.array_equal(sel.region[1], reference_selection(jets, scaled_pt, lepton_ok)["region"])
    # HT: all selected jets, summed in float32 like ak.sum over the float32 column
    arr = jagged(jets)
    sel_pt = arr.pt[(arr.pt > 30) & (abs(arr.eta) < 2.4) & ((arr.jetId & 4) != 0)]
    assert ak.sum(sel_pt, axis=1).type.content.primitive == "float32"
    assert sel.obs[0][2] == ak.sum(sel_pt, axis=1)[2] == F32(60) + F32(45) + F32(40) + F32(35)
    # the nominal varied pTs are those of the processor's BDT input, and the per-jet mask is the selection's
    selected = selected_jets(jets, jets["pt"], jet_mask(jets["pt"], jet_mask_fixed(jets)), np.ones(5, bool),
                             fields=("pt",))
    assert ak.to_list(selected.pt) == ak.to_list(sel_pt)


def test_trijet_first_maximum_and_combinations_order() -> None:
    """Exact tie between candidates (0,1,2) and (0,1,3): same pT and phi, opposite eta -> the first wins."""
    tie = [(100, 0.5, 0.0, 10, 0.9, 6), (90, 0.0, 0.3, 10, 0.1, 6), (40, 1.0, 0.1, 5, 0.8, 6),
           (40, -1.0, 0.1, 5, 0.8, 6)]
    rng = np.random.default_rng(5)
    rand = [[(float(p), float(e), float(f), 5.0, float(b), 6) for p, e, f, b in
             zip(np.sort(rng.uniform(31, 200, n))[::-1], rng.uniform(-2, 2, n), rng.uniform(-3, 3, n),
                 rng.uniform(0, 1, n), strict=True)] for n in rng.integers(4, 9, 300)]
    jets = jets_of([tie, *rand])
    lepton_ok = np.ones(len(rand) + 1, bool)
    sel = select_variations(jets, lepton_ok, variations=False)
    reference = reference_selection(jets, jets["pt"], lepton_ok)
    assert np.array_equal(sel.region[0], reference["region"])
    in_2b = sel.region[0] == REGION_4J2B
    ref = reference["mbjj"][in_2b]
    got = sel.obs[0][in_2b]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert len(ref) > 100
    x, y, z, e = reference["trijet"]
    # the tie really is a tie with different masses, and the first candidate was taken
    pts = np.sqrt(x**2 + y**2)[0]
    masses = np.sqrt(e**2 - (x**2 + y**2 + z**2))[0]
    assert pts[0] == pts[1] == ak.max(pts) and masses[0] != masses[1]
    assert got[0] == masses[0]


def test_jer_factors_deterministic_and_chunk_independent() -> None:
    rng = np.random.default_rng(2)
    n = 20000
    run = np.ones(n, np.uint32)
    lumi = rng.integers(1, 100, n).astype(np.uint32)
    event = np.unique(rng.integers(0, 2**40, n + 100))[:n].astype(np.uint64)
    counts = rng.integers(0, 10, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    f = jer_factors(run, lumi, event, offsets)
    assert np.array_equal(f, jer_factors(run, lumi, event, offsets))
    # a chunk [a, b) gets the same factors as in the whole
    a, b = 777, 5432
    sub = jer_factors(run[a:b], lumi[a:b], event[a:b], offsets[a:b + 1] - offsets[a])
    assert np.array_equal(sub, f[offsets[a]:offsets[b]])
    # events reordered: factors follow the event, not its position
    perm = rng.permutation(n)
    pc = counts[perm]
    pf = jer_factors(run[perm], lumi[perm], event[perm], np.concatenate([[0], np.cumsum(pc)]))
    back = ak.unflatten(pf, pc)[np.argsort(perm)]
    assert np.array_equal(ak.to_numpy(ak.flatten(back)), f)
    # Gaussian with mean 1, sigma 0.05; different jets of an event differ
    assert abs(f.mean() - 1) < 3 * 0.05 / np.sqrt(len(f))
    assert abs(f.std() - 0.05) < 0.002
    assert 0.04 < np.mean(np.abs(f - 1) > 0.1) < 0.051  # two-sided 2 sigma tail ~ 4.55 %
    assert len(np.unique(f)) == len(f)


def test_btag_weight_factors_match_agc_arithmetic() -> None:
    lead = np.array([[100, 60, 45, 31], [900, 200, 100, 50]], dtype=F32)
    w = btag_weight_factors(lead)
    assert sorted(w) == sorted(f"btag_var_{i}_{d}" for i in range(4) for d in ("up", "down"))
    agc = 1 + np.array([0.075, -0.075]) * (lead[:, 2] / 50)[:, None]
    assert np.array_equal(w["btag_var_2_up"], agc[:, 0]) and np.array_equal(w["btag_var_2_down"], agc[:, 1])
    assert w["btag_var_0_down"][1] < 0


def test_compiled_hash_is_splitmix64() -> None:
    x = np.random.default_rng(3).integers(0, 2**63, 50, dtype=np.uint64) * np.uint64(2)
    assert [int(_mix(v)) for v in x] == [int(v) for v in splitmix64(x)]
    # a published splitmix64 value: the first output of seed 0 is 0xE220A8397B1DCDAF
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def test_skim_mask_equals_the_query_semantics(tmp_path: Any, nanoaod_writer: Any, reference_skim: Any) -> None:
    """``skim_mask`` (direct processing) keeps exactly the events of the independent skim reference, on
    NanoAOD-like events piled up at every cut edge (pT 25 / 29.2 / 30, |eta| float32(2.1) / 2.4, b-tag 0.5)."""
    import uproot

    from agc_sx.selection import select_leptons, skim_mask

    path = nanoaod_writer(tmp_path / "nano.root", 4000, 5)
    with uproot.open(path) as f:
        a = f["Events"].arrays()

    def coll(name: str, fields: tuple[str, ...]) -> Collection:
        return Collection.from_awkward(ak.zip({k: a[f"{name}_{k}"] for k in fields}), fields)

    jets = coll("Jet", ("pt", "eta", "jetId", "btagCSVV2"))
    electrons = coll("Electron", ("pt", "eta", "cutBased", "sip3d"))
    muons = coll("Muon", ("pt", "eta", "tightId", "sip3d", "pfRelIso04_all"))
    keep = skim_mask(jets, select_leptons(electrons, muons))
    expected = np.asarray(reference_skim(path).event)
    assert 0 < keep.sum() < len(keep)
    np.testing.assert_array_equal(np.asarray(a.event)[keep], expected)
    # the loose 25 GeV threshold matters here: with the analysis' 30 GeV the skim would keep fewer events
    jets30 = Collection(jets.offsets, {**jets.fields, "pt": np.where(jets["pt"] > 30, jets["pt"], F32(0))})
    assert skim_mask(jets30, select_leptons(electrons, muons)).sum() < keep.sum()


def test_select_variations_matches_the_reference_on_every_varied_pt_column() -> None:
    """The one-pass kernel, which varies pTs in registers, gives for each column of ``jet_pt_variations``
    (what the BDT gets) the regions, observables and leading pTs of the plain-awkward reference, and
    ``selected_jets`` + ``jet_mask`` hand the BDT exactly the reference's selected jets."""
    rng = np.random.default_rng(3)
    n = 3000
    counts = rng.integers(0, 10, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    nj = int(offsets[-1])
    pt = np.where(rng.random(nj) < 0.2, rng.choice(np.array([29.5, 30.0, 29.2], F32), nj),
                  (20 + rng.exponential(40, nj))).astype(F32)
    jets = Collection(offsets, {
        "pt": pt, "eta": rng.uniform(-2.6, 2.6, nj).astype(F32), "phi": rng.uniform(-3.1, 3.1, nj).astype(F32),
        "mass": rng.uniform(2, 20, nj).astype(F32), "btagCSVV2": np.where(rng.random(nj) < 0.1, F32(0.5),
                                                                           rng.random(nj)).astype(F32),
        "jetId": rng.choice(np.array([0, 2, 6], np.int32), nj)})
    lepton_ok = rng.random(n) < 0.8
    run, lumi, event = np.ones(n, np.uint32), rng.integers(1, 9, n).astype(np.uint32), np.arange(n, dtype=np.uint64)
    one_pass = select_variations(jets, lepton_ok, run, lumi, event, variations=True)
    nominal_only = select_variations(jets, lepton_ok, variations=False)
    columns = jet_pt_variations(pt, run, lumi, event, offsets)
    assert tuple(columns) == C.JET_VARIATIONS
    for v, (name, varied_pt) in enumerate(columns.items()):
        ref = reference_selection(jets, varied_pt, lepton_ok)
        np.testing.assert_array_equal(one_pass.region[v], ref["region"], err_msg=name)
        for code in (REGION_4J1B, REGION_4J2B):
            in_region = ref["region"] == code
            ref_obs = (ref["ht"] if code == REGION_4J1B else ref["mbjj"])[in_region].astype(np.float64)
            if code == REGION_4J1B:  # HT sums exactly as ak.sum, in the column's dtype
                np.testing.assert_array_equal(one_pass.obs[v][in_region], ref_obs, err_msg=name)
            else:  # same candidate and arithmetic; numpy's and numba's cos/sinh may differ in the last ulp
                np.testing.assert_allclose(one_pass.obs[v][in_region], ref_obs, rtol=1e-12, err_msg=name)
        in_2b = ref["region"] == REGION_4J2B
        bdt_jets = selected_jets(jets, varied_pt, jet_mask(varied_pt, jet_mask_fixed(jets)), in_2b,
                                 fields=("pt", "eta", "phi", "mass", "btagCSVV2"))
        assert ak.to_list(bdt_jets.pt) == ak.to_list(ref["jets"].pt[in_2b]), name
        assert ak.to_list(bdt_jets.eta) == ak.to_list(ref["jets"].eta[in_2b]), name
        if v == 0:
            passed = ref["region"] != NO_REGION
            np.testing.assert_array_equal(one_pass.lead_pt[passed], ref["lead_pt"][passed])
            # without variations: the same nominal numbers (the ML training path)
            np.testing.assert_array_equal(nominal_only.region[0], one_pass.region[0])
            np.testing.assert_array_equal(nominal_only.obs[0][passed], one_pass.obs[0][passed])
            # HT really is summed in float32: a float64 sum would differ on some events
            in_1b = ref["region"] == REGION_4J1B
            ht64 = ak.to_numpy(ak.sum(ak.values_astype(ref["jets"].pt, np.float64), axis=1))[in_1b]
            assert np.any(ht64 != one_pass.obs[0][in_1b])
    assert (one_pass.region != NO_REGION).sum() > 100
    assert not np.array_equal(one_pass.region[0], one_pass.region[2])  # the variations matter here
    # the event identity seeds pt_res_up: asking for variations without it is an error
    with pytest.raises(ValueError, match="run, lumi and event"):
        select_variations(jets, lepton_ok, variations=True)
