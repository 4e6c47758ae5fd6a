"""AGC v2 object and event selection, regions and observables, on awkward arrays of any origin.

The public functions take awkward collections (``events.Jet`` from the skim schema, coffea's NanoAOD schema or a
plain ``ak.zip``) so direct NanoAOD processing and streaming reuse them unchanged. Internally the jagged
collections are reduced to flat numpy columns plus offsets (:class:`Collection`), cuts are evaluated with numpy
in the column's precision (float32 columns against Python floats compare in float32, as in the AGC), and the
per-event work -- counting, HT and the trijet search -- runs in one numba pass over the offsets.

Bin-exactness conventions (see ``physics-conventions.md``):

- HT is summed sequentially in the pT column's dtype, like ``ak.sum`` (float32 for nominal jets, float64 for
  varied ones).
- The trijet search walks candidates in ``ak.combinations(jets, 3)`` order, keeps those with a tagged jet and
  the *first* one with the largest vector-sum pT (``ak.argmax``). Four-momenta are summed in float64 Cartesian
  components (px = pT cos phi, py = pT sin phi, pz = pT sinh eta, E = sqrt(p^2 + m^2)); coffea's vector
  library adds PtEtaPhiM vectors in polar float32 arithmetic instead, which can only differ on candidates whose
  pT agree to float32 precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import awkward as ak
import numba
import numpy as np

from .constants import (
    BTAG_WP,
    ELECTRON_CUTBASED,
    JER_SIGMA,
    JES_UP_FACTOR,
    JET_ABS_ETA_MAX,
    JET_ID_MASK,
    JET_PT_MIN,
    LEPTON_ABS_ETA_MAX,
    LEPTON_PT_MIN,
    LEPTON_SIP3D_MAX,
    MIN_JETS,
    MUON_ISO_MAX,
    SKIM_JET_PT_MIN,
)
from .systematics import JER_SEED, _event_key, _pair_normals

#: Region codes returned per event and jet variation by :func:`select_variations`.
NO_REGION, REGION_4J1B, REGION_4J2B = 0, 1, 2
REGION_CODES: dict[str, int] = {"4j1b": REGION_4J1B, "4j2b": REGION_4J2B}


@dataclass
class Collection:
    """A jagged collection as offsets (length n+1, int64, starting at 0) and flat numpy fields."""

    offsets: np.ndarray
    fields: dict[str, np.ndarray]

    @property
    def counts(self) -> np.ndarray:
        """Objects per event."""
        return np.diff(self.offsets)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fields[name]

    @classmethod
    def from_awkward(cls, collection: Any, names: tuple[str, ...]) -> Collection:
        """Flatten the fields ``names`` of a jagged awkward record array (virtual columns are read here).

        A plain ``ListOffsetArray`` of a record of numbers (what NanoEvents builds) is taken apart directly,
        buffer by buffer, so each column is read once and nothing else is materialised; anything else goes
        through ``ak.flatten``.
        """
        direct = _direct_buffers(collection, names)
        if direct is not None:
            return direct
        counts = np.asarray(ak.num(collection, axis=1), dtype=np.int64)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        fields = {n: np.asarray(ak.to_numpy(ak.flatten(collection[n], axis=1))) for n in names}
        return cls(offsets, fields)

    def take(self, events: np.ndarray) -> Collection:
        """The collection restricted to the events of the boolean mask ``events`` (whole events kept)."""
        keep = np.repeat(events, self.counts)
        counts = self.counts[events]
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Collection(offsets, {n: v[keep] for n, v in self.fields.items()})


def _buffer(data: Any) -> np.ndarray:
    """A layout buffer as numpy, reading a virtual (lazily loaded) buffer on first use."""
    materialize = getattr(data, "materialize", None)
    return np.asarray(materialize() if materialize is not None else data)


def _direct_buffers(collection: Any, names: tuple[str, ...]) -> Collection | None:
    layout = collection.layout if isinstance(collection, ak.Array) else None
    if not isinstance(layout, ak.contents.ListOffsetArray) or not isinstance(layout.content,
                                                                               ak.contents.RecordArray):
        return None
    record = layout.content
    contents = {}
    for n in names:
        if n not in record.fields:
            return None
        c = record.content(n)
        if not isinstance(c, ak.contents.NumpyArray) or c.parameter("__array__") is not None or c.inner_shape:
            return None
        contents[n] = c
    offsets = _buffer(layout.offsets.data).astype(np.int64, copy=False)
    start, stop = int(offsets[0]), int(offsets[-1])
    fields = {n: _buffer(c.data)[start:stop] for n, c in contents.items()}
    return Collection(offsets - start if start else offsets, fields)


def flat_column(array: Any) -> np.ndarray:
    """A flat (per-event) awkward column as numpy, reading a virtual buffer directly."""
    layout = array.layout if isinstance(array, ak.Array) else None
    if isinstance(layout, ak.contents.NumpyArray) and layout.parameter("__array__") is None and not layout.inner_shape:
        return _buffer(layout.data)
    return np.asarray(ak.to_numpy(array))


def per_event_count(offsets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Number of True entries of a flat ``mask`` in each event."""
    csum = np.zeros(len(mask) + 1, dtype=np.int64)
    np.cumsum(mask, out=csum[1:])
    return csum[offsets[1:]] - csum[offsets[:-1]]


def _finite(collection: Collection, names: tuple[str, ...]) -> np.ndarray:
    """Objects whose ``names`` are all finite numbers.

    A corrupted or unusual file can hold +-inf or NaN in a float column. Such an object fails the object
    selection, as a physicist would expect: NaN already fails every cut, but +inf passes ``pt > 30`` and -inf
    passes ``sip3d < 4``, and a single infinite jet would make the trijet sums, HT and the b-tag weights
    non-finite.
    """
    ok = np.isfinite(collection[names[0]])
    for name in names[1:]:
        ok &= np.isfinite(collection[name])
    return ok


def electron_mask(electrons: Collection) -> np.ndarray:
    """AGC v2 tight electrons: pT > 30, |eta| < 2.1, cutBased == 4 (tight), sip3d < 4 (finite values)."""
    return (
        _finite(electrons, ("pt", "sip3d"))
        & (electrons["pt"] > LEPTON_PT_MIN)
        & (np.abs(electrons["eta"]) < LEPTON_ABS_ETA_MAX)
        & (electrons["cutBased"] == ELECTRON_CUTBASED)
        & (electrons["sip3d"] < LEPTON_SIP3D_MAX)
    )


def muon_mask(muons: Collection) -> np.ndarray:
    """AGC v2 tight muons: pT > 30, |eta| < 2.1, tightId, sip3d < 4, pfRelIso04_all < 0.15 (finite values)."""
    return (
        _finite(muons, ("pt", "sip3d", "pfRelIso04_all"))
        & (muons["pt"] > LEPTON_PT_MIN)
        & (np.abs(muons["eta"]) < LEPTON_ABS_ETA_MAX)
        & muons["tightId"].astype(bool)
        & (muons["sip3d"] < LEPTON_SIP3D_MAX)
        & (muons["pfRelIso04_all"] < MUON_ISO_MAX)
    )


def _jet_eta_id(jets: Collection) -> np.ndarray:
    return (np.abs(jets["eta"]) < JET_ABS_ETA_MAX) & ((jets["jetId"] & JET_ID_MASK) != 0)


def jet_mask_fixed(jets: Collection) -> np.ndarray:
    """The pT-independent part of the jet selection: |eta| < 2.4, tight-lepton-veto ID (jetId bit 2), and
    finite pT, eta, phi, mass and b-tag score (see :func:`_finite`).
    """
    return _jet_eta_id(jets) & _finite(jets, ("pt", "eta", "phi", "mass", "btagCSVV2"))


def btag_mask(jets: Collection) -> np.ndarray:
    """b-tagged: btagCSVV2 > 0.5, strictly (a score of exactly 0.5 is not tagged)."""
    return np.asarray(jets["btagCSVV2"] > BTAG_WP)


def jet_mask(jet_pt: np.ndarray, fixed_mask: np.ndarray) -> np.ndarray:
    """The full per-jet selection for one jet variation: pT > 30 in the column's precision (float32 for the
    nominal column, float64 for varied ones, as the compiled kernel compares) and the pT-independent cuts.
    """
    return np.asarray((jet_pt > JET_PT_MIN) & fixed_mask)


@dataclass
class LeptonSelection:
    """Selected electrons and muons (flat masks) and the per-event "exactly one lepton" flag."""

    electron: np.ndarray
    muon: np.ndarray
    one_lepton: np.ndarray


def select_leptons(electrons: Collection, muons: Collection) -> LeptonSelection:
    """The selected electrons and muons and the per-event exactly-one-lepton flag."""
    ele = electron_mask(electrons)
    mu = muon_mask(muons)
    n_lep = per_event_count(electrons.offsets, ele) + per_event_count(muons.offsets, mu)
    return LeptonSelection(ele, mu, n_lep == 1)


def single_lepton(electrons: Collection, muons: Collection, leptons: LeptonSelection,
                  events: np.ndarray) -> ak.Array:
    """The one selected lepton (pt, eta, phi, mass) of each event in the boolean mask ``events``.

    Every event in ``events`` must have exactly one selected lepton, so exactly one of the electron or muon
    candidates is kept.
    """
    out: dict[str, np.ndarray] = {}
    for coll, mask in ((electrons, leptons.electron), (muons, leptons.muon)):
        event_of = np.repeat(np.arange(len(coll.offsets) - 1), coll.counts)
        keep = mask & events[event_of]
        order = event_of[keep]
        for name in ("pt", "eta", "phi", "mass"):
            out.setdefault(name, np.empty(int(events.sum()), dtype=coll[name].dtype))
        pos = np.searchsorted(np.flatnonzero(events), order)
        for name in ("pt", "eta", "phi", "mass"):
            out[name][pos] = coll[name][keep]
    return ak.zip(out)


def selected_jets(jets: Collection, jet_pt: np.ndarray, jet_selected: np.ndarray, events: np.ndarray,
                  fields: tuple[str, ...] = ("pt", "eta", "phi", "mass", "btagCSVV2", "qgl")) -> ak.Array:
    """The selected jets (in their pT order) of the events in the boolean mask ``events``, as an awkward array.

    ``jet_selected`` is the flat per-jet mask of the variation (:func:`jet_mask` of ``jet_pt``); ``pt`` is
    the variation's ``jet_pt``, the other fields come from the collection.
    """
    event_of = np.repeat(events, jets.counts)
    keep = jet_selected & event_of
    counts = per_event_count(jets.offsets, keep)[events]
    cols = {f: (jet_pt if f == "pt" else jets[f])[keep] for f in fields}
    return ak.unflatten(ak.zip(cols), counts)


def skim_mask(jets: Collection, leptons: LeptonSelection) -> np.ndarray:
    """Per-event mask of the delivery skim (``agc_sx/_data/queries/skim.py``), vectorised for direct NanoAOD processing.

    Exactly one tight lepton; at least four jets with pT > 25, |eta| < 2.4 and jet ID; at least one of them
    b-tagged. Applying it first makes direct processing see exactly the delivered events: without it the
    upward ``pt_res_up`` fluctuations could promote events the skim drops, and the two pipelines would differ.
    Cuts compare in the columns' float32 precision, as the query's do.
    """
    loose = (jets["pt"] > SKIM_JET_PT_MIN) & _jet_eta_id(jets)  # as the query counts: no finiteness test
    n_loose = per_event_count(jets.offsets, loose)
    n_tagged = per_event_count(jets.offsets, loose & btag_mask(jets))
    return np.asarray(leptons.one_lepton & (n_loose >= MIN_JETS) & (n_tagged >= 1))


@dataclass
class VariationSelection:
    """Regions and observables of every jet variation of a chunk, from one pass (:func:`select_variations`).

    ``region[v]`` holds :data:`REGION_CODES` per event for variation ``v`` (0 nominal, 1 ``pt_scale_up``,
    2 ``pt_res_up``); ``obs[v]`` the region's observable as float64 (HT in 4j1b, m_bjj in 4j2b, undefined
    elsewhere); ``lead_pt`` the pT of the four leading selected *nominal* jets (float32, NaN where absent).
    """

    region: np.ndarray
    obs: np.ndarray
    lead_pt: np.ndarray

    def in_region(self, variation: int, region: str) -> np.ndarray:
        """Per-event mask of ``region`` for jet variation number ``variation``."""
        return np.asarray(self.region[variation] == REGION_CODES[region])


@numba.njit(cache=True, nogil=True)
def _variations_kernel(  # pragma: no cover - compiled
    offsets: np.ndarray, pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, mass: np.ndarray,
    fixed: np.ndarray, tagged: np.ndarray, lepton_ok: np.ndarray, run: np.ndarray, lumi: np.ndarray,
    event: np.ndarray, seed: np.uint64, jes: float, jer_sigma: float, pt_min: float, min_jets: int,
    region: np.ndarray, obs: np.ndarray, lead_pt: np.ndarray,
) -> None:
    n_var = region.shape[0]
    n_events = len(offsets) - 1
    pt_min32 = np.float32(pt_min)
    max_jets = 0
    for e in range(n_events):
        max_jets = max(max_jets, offsets[e + 1] - offsets[e])
    normal = np.empty(max_jets + 1)
    vpt = np.empty(max_jets)
    sel = np.empty(max_jets, dtype=np.int64)
    trig = np.empty((max_jets, 3))
    trig_done = np.zeros(max_jets, dtype=np.bool_)
    px = np.empty(max_jets)
    py = np.empty(max_jets)
    pz = np.empty(max_jets)
    tag = np.empty(max_jets, dtype=np.bool_)
    for e in range(n_events):
        for i in range(lead_pt.shape[1]):
            lead_pt[e, i] = np.nan
        first, stop = offsets[e], offsets[e + 1]
        if not lepton_ok[e]:
            continue
        # jets failing |eta| or jet ID never count; without four such jets and a tag, no variation can pass
        n_fixed = 0
        any_tag = False
        for j in range(first, stop):
            if fixed[j]:
                n_fixed += 1
                any_tag = any_tag or tagged[j]
        if n_fixed < min_jets or not any_tag:
            continue
        if n_var == 3:
            key = _event_key(seed, np.uint64(run[e]), np.uint64(lumi[e]), np.uint64(event[e]))
            for k in range(0, stop - first, 2):
                if fixed[first + k] or (first + k + 1 < stop and fixed[first + k + 1]):
                    normal[k], normal[k + 1] = _pair_normals(key, np.int64(k >> 1))
        for k in range(stop - first):
            trig_done[k] = False
        for v in range(n_var):
            n = 0
            nb = 0
            ht32 = np.float32(0.0)
            ht64 = 0.0
            for j in range(first, stop):
                if not fixed[j]:
                    continue
                k = j - first
                if v == 0:
                    p = np.float64(pt[j])
                elif v == 1:
                    p = np.float64(pt[j]) * jes
                else:
                    p = np.float64(pt[j]) * (1.0 + jer_sigma * normal[k])
                if not (pt[j] > pt_min32 if v == 0 else p > pt_min):  # nominal: float32 comparison
                    continue
                if v == 0:
                    ht32 += pt[j]  # float32 sum, like ak.sum over the float32 column
                    if n < lead_pt.shape[1]:
                        lead_pt[e, n] = pt[j]
                else:
                    ht64 += p
                vpt[n] = p
                sel[n] = k
                n += 1
                if tagged[j]:
                    nb += 1
            region[v, e] = 0
            if n < min_jets or nb == 0:
                continue
            if nb == 1:
                region[v, e] = 1
                obs[v, e] = np.float64(ht32) if v == 0 else ht64
                continue
            region[v, e] = 2
            for i in range(n):
                k = sel[i]
                if not trig_done[k]:
                    f = np.float64(phi[first + k])
                    trig[k, 0] = np.cos(f)
                    trig[k, 1] = np.sin(f)
                    trig[k, 2] = np.sinh(np.float64(eta[first + k]))
                    trig_done[k] = True
                px[i] = vpt[i] * trig[k, 0]
                py[i] = vpt[i] * trig[k, 1]
                tag[i] = tagged[first + k]
            best = -1.0
            best_q = -1.0
            ba = bb = bc = -1
            for a in range(n - 2):
                for b in range(a + 1, n - 1):
                    for c in range(b + 1, n):
                        if not (tag[a] or tag[b] or tag[c]):
                            continue
                        sx = px[a] + px[b] + px[c]
                        sy = py[a] + py[b] + py[c]
                        q = sx * sx + sy * sy
                        if q > best_q:  # sqrt is monotonic: only a larger square can give a larger pT
                            spt = np.sqrt(q)
                            if spt > best:  # strict: the first maximum wins, like ak.argmax
                                best = spt
                                best_q = q
                                ba, bb, bc = a, b, c
            if ba < 0:  # no candidate (only with non-finite inputs, which the masks exclude): never index
                region[v, e] = 0
                continue
            sx = px[ba] + px[bb] + px[bc]
            sy = py[ba] + py[bb] + py[bc]
            se = 0.0
            for i in (ba, bb, bc):
                k = sel[i]
                pz[i] = vpt[i] * trig[k, 2]
                m = np.float64(mass[first + k])
                se += np.sqrt(px[i] * px[i] + py[i] * py[i] + pz[i] * pz[i] + m * m)
            sz = pz[ba] + pz[bb] + pz[bc]
            m2 = se * se - (sx * sx + sy * sy + sz * sz)
            obs[v, e] = np.sqrt(m2) if m2 > 0.0 else 0.0


def select_variations(
    jets: Collection, lepton_ok: np.ndarray, run: np.ndarray | None = None, lumi: np.ndarray | None = None,
    event: np.ndarray | None = None, *, variations: bool, fixed_mask: np.ndarray | None = None,
    tagged: np.ndarray | None = None,
) -> VariationSelection:
    """Regions and observables of the nominal jets and, with ``variations``, of ``pt_scale_up`` and
    ``pt_res_up``, in one compiled pass over the events: the one implementation of the event selection.

    ``lepton_ok`` is the per-event "exactly one selected lepton" flag; the event identity (``run``, ``lumi``,
    ``event``) seeds the resolution factors and is needed only with ``variations``. The varied pTs are those
    of :func:`agc_sx.systematics.jet_pt_variations` (the columns the BDT gets), computed per event in
    registers without building the columns: the resolution factors only for jets that pass |eta| and jet ID,
    the trigonometry once per jet for all variations, and events that cannot pass in any variation skipped.
    """
    if variations and (run is None or lumi is None or event is None):
        raise ValueError("select_variations: jet variations need run, lumi and event")
    if fixed_mask is None:
        fixed_mask = jet_mask_fixed(jets)
    if tagged is None:
        tagged = btag_mask(jets)
    # the event identity is never read without variations: empty columns keep the kernel's one signature
    run_id, lumi_id, event_id = (np.zeros(0, dtype=np.uint64) if a is None else np.asarray(a, dtype=np.uint64)
                                 for a in (run, lumi, event))
    n = len(jets.offsets) - 1
    n_var = 3 if variations else 1
    region = np.zeros((n_var, n), dtype=np.int8)
    obs = np.empty((n_var, n), dtype=np.float64)
    lead_pt = np.empty((n, MIN_JETS), dtype=np.float32)
    if n:
        _variations_kernel(
            jets.offsets, np.asarray(jets["pt"], dtype=np.float32), jets["eta"], jets["phi"], jets["mass"],
            np.asarray(fixed_mask, dtype=np.bool_), np.asarray(tagged, dtype=np.bool_),
            np.asarray(lepton_ok, dtype=np.bool_), run_id, lumi_id, event_id, JER_SEED,
            float(JES_UP_FACTOR), float(JER_SIGMA), float(JET_PT_MIN), MIN_JETS, region, obs, lead_pt,
        )
    return VariationSelection(region, obs, lead_pt)
