"""Jet–parton permutations and the 20 BDT features of the AGC v2, built without per-event Python.

Every event contributes the permutations of its leading ``min(n_jets, 6)`` jets. Instead of a Python list of
permutations per event (the AGC way), the jets are flattened once and one precomputed index table per jet count
is gathered with NumPy, so the cost is a handful of array operations per chunk, whatever the number of events.
"""

from __future__ import annotations

import itertools
from functools import cache
from typing import Any, Final

import awkward as ak
import numba
import numpy as np
from numpy.typing import NDArray

from ..constants import MIN_JETS, ML_FEATURES

#: Feature name, histogram bins, low and high edge, in the order the models expect their inputs.
FEATURES: Final = ML_FEATURES
FEATURE_NAMES: Final = tuple(f[0] for f in FEATURES)
N_FEATURES: Final = len(FEATURES)
#: Only the leading jets (in pT) enter the permutations.
MAX_JETS: Final = 6
#: Slots of a permutation row.
W1, W2, B_HAD, B_LEP = 0, 1, 2, 3
JET_FIELDS: Final = ("pt", "eta", "phi", "mass", "btagCSVV2", "qgl")
LEPTON_FIELDS: Final = ("pt", "eta", "phi", "mass")


@cache
def _table(n: int) -> NDArray[np.int64]:
    # itertools.permutations is lexicographic, like the AGC's filtered ak.argcartesian; the AGC then drops the
    # first of each W-swapped pair, i.e. it keeps the row whose W1 index is the larger one.
    rows = [p for p in itertools.permutations(range(n), 4) if p[0] > p[1]]
    table = np.array(rows, dtype=np.int64).reshape(-1, 4)
    table.setflags(write=False)
    return table


def permutation_table(n_jets: int) -> NDArray[np.int64]:
    """Jet indices (W1, W2, b_had, b_lep) of every permutation for ``n_jets`` jets: 12 / 60 / 180 rows.

    Rows follow the AGC ``get_permutations_dict`` order; jets beyond the sixth are ignored. Read-only.
    """
    if n_jets < MIN_JETS:
        raise ValueError(f"jet-parton permutations need at least {MIN_JETS} jets, got {n_jets}")
    return _table(min(int(n_jets), MAX_JETS))


# All tables stacked, with the first row of each jet count, so that one gather serves every event.
_ALL_TABLE: Final = np.concatenate([_table(n) for n in range(MIN_JETS, MAX_JETS + 1)])
_N_PERM: Final = np.zeros(MAX_JETS + 1, dtype=np.int64)
_TABLE_START: Final = np.zeros(MAX_JETS + 1, dtype=np.int64)
for _n, _start in zip(
    range(MIN_JETS, MAX_JETS + 1),
    np.cumsum([0] + [len(_table(n)) for n in range(MIN_JETS, MAX_JETS)]),
    strict=True,
):
    _N_PERM[_n] = len(_table(_n))
    _TABLE_START[_n] = _start


class FlatEvents:
    """Jets flattened to NumPy (one array per field) plus per-event lepton columns and jet offsets.

    Built once per chunk; the feature builder then gathers from it for any subset of events.
    """

    def __init__(self, jets: Any, lepton: Any) -> None:
        jets = ak.Array(jets)
        lepton = ak.Array(lepton)
        if jets.ndim != 2:
            raise ValueError(f"jets must be a jagged array (events x jets), got type {jets.type}")
        missing = [f for f in JET_FIELDS if f not in jets.fields]
        if missing:
            raise ValueError(f"jets lack field(s) {', '.join(missing)} needed by the BDT")
        if lepton.ndim == 2:  # e.g. concatenated electrons + muons: must hold exactly one lepton per event
            n_lep = ak.to_numpy(ak.num(lepton, axis=1))
            if np.any(n_lep != 1):
                raise ValueError("the BDT needs exactly one lepton per event")
            lepton = ak.flatten(lepton, axis=1)
        missing = [f for f in LEPTON_FIELDS if f not in lepton.fields]
        if missing:
            raise ValueError(f"lepton lacks field(s) {', '.join(missing)} needed by the BDT")
        if len(lepton) != len(jets):
            raise ValueError(f"{len(jets)} events of jets but {len(lepton)} leptons")
        counts = ak.to_numpy(ak.num(jets, axis=1)).astype(np.int64)
        if counts.size and counts.min() < MIN_JETS:
            bad = int(np.argmax(counts < MIN_JETS))
            raise ValueError(
                f"the BDT needs at least {MIN_JETS} jets per event; event {bad} has {int(counts[bad])}"
            )
        self.n_events = len(counts)
        self.n_jets = np.minimum(counts, MAX_JETS)
        self.starts = np.cumsum(counts) - counts
        self.n_perm = _N_PERM[self.n_jets]
        self.jet = {f: np.asarray(ak.to_numpy(ak.flatten(jets[f], axis=1))) for f in JET_FIELDS}
        self.lep = {f: np.asarray(ak.to_numpy(lepton[f])) for f in LEPTON_FIELDS}
        # Cartesian components once per jet (float64), so that sums of 2-3 jets are gathers plus adds.
        self.jet_p4 = _p4(self.jet)
        self.lep_p4 = _p4(self.lep)

    def features(self, events: NDArray[np.int64] | None = None) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Features (n_rows x 20, float32) of every permutation of ``events`` (default all), and row counts."""
        events = np.arange(self.n_events) if events is None else np.asarray(events, dtype=np.int64)
        counts = self.n_perm[events]
        out = np.empty((int(counts.sum()), N_FEATURES), dtype=np.float32)
        j, lep = self.jet, self.lep
        px, py, pz, e = self.jet_p4
        lpx, lpy, lpz, le = self.lep_p4
        _fill_features(
            events, self.n_jets, self.starts, np.cumsum(counts) - counts, _ALL_TABLE, _TABLE_START, _N_PERM,
            j["eta"], j["phi"], j["pt"], j["btagCSVV2"], j["qgl"], px, py, pz, e,
            lep["eta"], lep["phi"], lpx, lpy, lpz, le, out,
        )
        return out, counts


@numba.njit(cache=True, nogil=True)
def _fill_features(  # pragma: no cover - compiled
    events: np.ndarray, n_jets: np.ndarray, starts: np.ndarray, row_first: np.ndarray, table: np.ndarray,
    table_start: np.ndarray, n_perm: np.ndarray, eta: np.ndarray, phi: np.ndarray, pt: np.ndarray,
    btag: np.ndarray, qgl: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray, e: np.ndarray,
    leta: np.ndarray, lphi: np.ndarray, lpx: np.ndarray, lpy: np.ndarray, lpz: np.ndarray, le: np.ndarray,
    out: np.ndarray,
) -> None:
    # One pass per row, no temporaries. ΔR stays in the columns' own precision and Δφ is not wrapped, exactly
    # as the models were trained; invariant masses are summed in float64.
    for k in range(events.shape[0]):
        i = events[k]
        t0 = table_start[n_jets[i]]
        s = starts[i]
        for p in range(n_perm[n_jets[i]]):
            r = row_first[k] + p
            a = s + table[t0 + p, 0]
            b = s + table[t0 + p, 1]
            h = s + table[t0 + p, 2]
            lb = s + table[t0 + p, 3]
            out[r, 0] = _delta_r(leta[i] - eta[lb], lphi[i] - phi[lb])
            out[r, 1] = _delta_r(eta[a] - eta[b], phi[a] - phi[b])
            out[r, 2] = _delta_r(eta[a] - eta[h], phi[a] - phi[h])
            out[r, 3] = _delta_r(eta[b] - eta[h], phi[b] - phi[h])
            out[r, 4] = _mass(lpx[i] + px[lb], lpy[i] + py[lb], lpz[i] + pz[lb], le[i] + e[lb])
            wx = px[a] + px[b]
            wy = py[a] + py[b]
            wz = pz[a] + pz[b]
            we = e[a] + e[b]
            out[r, 5] = _mass(wx, wy, wz, we)
            tx = wx + px[h]
            ty = wy + py[h]
            out[r, 6] = _mass(tx, ty, wz + pz[h], we + e[h])
            out[r, 7] = np.sqrt(tx * tx + ty * ty)
            out[r, 8] = pt[a]
            out[r, 9] = pt[b]
            out[r, 10] = pt[h]
            out[r, 11] = pt[lb]
            out[r, 12] = btag[a]
            out[r, 13] = btag[b]
            out[r, 14] = btag[h]
            out[r, 15] = btag[lb]
            out[r, 16] = qgl[a]
            out[r, 17] = qgl[b]
            out[r, 18] = qgl[h]
            out[r, 19] = qgl[lb]


@numba.njit(cache=True, inline="always")
def _delta_r(d_eta: float, d_phi: float) -> float:
    # in the precision of the columns (float32), Δφ not wrapped: as the models were trained
    return np.sqrt(d_eta * d_eta + d_phi * d_phi)


@numba.njit(cache=True, inline="always")
def _mass(px: float, py: float, pz: float, e: float) -> float:
    # Like `vector`'s tau (what coffea's .mass returns): a negative m² from rounding gives -sqrt(|m²|), not NaN.
    m2 = e * e - px * px - py * py - pz * pz
    return np.sqrt(m2) if m2 >= 0 else -np.sqrt(-m2)


def _p4(cols: dict[str, NDArray[Any]]) -> tuple[NDArray[np.float64], ...]:
    pt = cols["pt"].astype(np.float64)
    eta = cols["eta"].astype(np.float64)
    phi = cols["phi"].astype(np.float64)
    mass = cols["mass"].astype(np.float64)
    pz = pt * np.sinh(eta)
    return pt * np.cos(phi), pt * np.sin(phi), pz, np.sqrt(pt * pt + pz * pz + mass * mass)


def permutation_features(jets: Any, lepton: Any) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Features of every permutation of every event (rows event by event, table order) and rows per event.

    ``jets``: the selected, pT-ordered jets of events with at least four of them (fields pt, eta, phi, mass,
    btagCSVV2, qgl); ``lepton``: one record per event (pt, eta, phi, mass).
    """
    return FlatEvents(jets, lepton).features()
