"""A fast toy event generator writing CMS NanoAOD-format ROOT files for every sample of the catalogue.

No real CERN data is reachable offline, so the demo, the tests, the BDT training and the benchmarks run on events
made here. They are a toy, but one with the physics the AGC analysis looks at: ttbar decaying semileptonically,
dileptonically and fully hadronically in the W branching fractions, t -> bW at the right masses (Breit-Wigner
line shapes), jets from partons with a pT-dependent resolution plus radiation and pile-up jets, CSVv2-like b-tag
scores by flavour, prompt leptons with ID, isolation and impact parameter and non-prompt/fake leptons from jets;
single top in the s-, t- and tW-channels (with the spectator b of t- and tW-channel); W+jets with mostly light
jets. Everything is vectorised numpy: objects
live in flat arrays with an event index and are pT-ordered per event with one ``lexsort``.

Files are TTrees ``Events`` (uproot ``mktree``/``extend``; assigning ``file[name] = ...`` would write an RNTuple
with uproot >= 5.7) whose branch names and dtypes are those of real 2015 AGC NanoAOD, counters included
(``nJet`` etc. are ``uint32`` as in NanoAOD, not uproot's default ``int32``).

Calibration: at 3.378 /fb the toy reproduces the real AGC v2 yields per process and region (ttbar 23.4 k in
4j1b and 52.4 k in 4j2b, W+jets 6.0 k and 2.0 k, ...) within 25 %, with the AGC's landmarks (m_bjj peaking at
the top mass, HT means near 300 GeV with a tail beyond 550 GeV). The real AGC acceptance (3 % for ttbar) is
lower than a textbook estimate; the toy puts the difference into the lepton identification efficiency
(``_RECO_EFF_E``, ``_RECO_EFF_MU``), shared by all processes. ``tests/test_generate.py`` checks the table.

Generator-level filters: each sample holds only events that can reach the one-lepton, >= 4-jet regions, so
20,000 events per sample put hundreds of simulated events (not a handful of heavy ones) into every region.
As for real filtered MC, the catalogue's ``xsec`` is the effective cross section sigma x filter efficiency
and ``nevts`` counts the events in the files; ``generator.json`` beside the catalogue records every filter and
its efficiency. The filters (see ``_FILTERS``): the W decay modes (drawn from the branching fractions
conditioned on a leptonic decay, exact), the number of hard radiation partons of W+jets (a geometric
staircase conditioned on >= 3, exact), and a kinematic part -- an electron or muon with pT > 25 GeV,
|eta| < 2.3 and >= 4 (s-channel: 3) generator jets with pT > 20 GeV, |eta| < 2.7 -- applied by generating
until enough events pass, its efficiency being kept / tried. Generating without the filters
(``filtered=False``) shows that they drop 1-4 % of what the selection keeps (events with fake leptons or a
jet from pile-up).

Determinism: every chunk of events draws from its own ``numpy`` Generator seeded by (seed, sample name, file
index, chunk index), so the same seed gives byte-identical arrays, and samples/files are independent.

GenPart conventions (hard process only, one copy per particle, mothers always before daughters):

* ``pdgId`` follows the PDG: quarks > 0, antiquarks < 0; ``e-`` = 11, ``e+`` = -11 (likewise 13, 15); neutrinos
  12/14/16 > 0, antineutrinos < 0; ``W+`` = 24, ``W-`` = -24; ``t`` = 6, ``tbar`` = -6; gluon 21.
* ``status``: 21 incoming partons (pT = 0, ``eta`` = +-(22756 + |pz|) as ROOT writes for pT = 0, mother -1);
  62 top quarks (and the W of W+jets) -- the copy whose daughters are listed; 22 W bosons from top decay and the
  W of tW; 23 outgoing quarks (b from top, quarks from W, the recoiling quark of single top); 1 stable leptons and
  neutrinos; 2 tau leptons (decayed; their decay products are not listed).
* ``genPartIdxMother`` is the row index of the mother in the same event, -1 for incoming partons. A b from a top
  has ``abs(pdgId) == 5`` and a mother with ``abs(pdgId) == 6``; quarks from a W have ``abs(pdgId) <= 4`` and a
  mother with ``abs(pdgId) == 24``. W daughters come in the order (charged lepton or up-type quark, neutrino or
  down-type quark).
* Layouts (fixed per process): ttbar ``[p, p, t, tbar, b, W+, W+ d1, W+ d2, bbar, W-, W- d1, W- d2]``;
  s-channel ``[q, qbar', t, bbar, b, W, d1, d2]``; t-channel ``[q, g, t, q', spectator bbar, b, W, d1, d2]``;
  tW ``[g, b, t, W, b, W(t), d1, d2, W d1, W d2, spectator bbar]``; W+jets ``[q, qbar', W, d1, d2]`` (charge conjugated where
  the event has an antitop or a W-).

Reconstructed jets from a parton keep its direction up to the angular resolution (a few 0.01 in eta/phi), so
matching jets to GenPart within Delta R < 0.4 recovers the partons. Nearby partons are not merged into one jet.

The variations of ttbar are modest, visible changes of the nominal tune: ``scaleup``/``scaledown`` more/less
initial- and final-state radiation, ``ME_var`` a softer top-pair mass spectrum and negative generator weights as
from an NLO generator, ``PS_var`` a different jet response, resolution, b fragmentation and radiation.
``genWeight`` is +-1 (the AGC normalises by event counts, never by generator weights).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import uproot

from .catalogue import Catalog, InputFile, Sample, load_catalog, save_catalog
from .constants import TOP_MASS, TOP_WIDTH, W_MASS, W_WIDTH
from .utils import atomic_path, atomic_write_text

__all__ = [
    "DEFAULT_EVENTS_PER_FILE", "DEFAULT_FILES_PER_SAMPLE", "FILTER_PT", "KIN_FILTER_ETA", "KIN_FILTER_PT",
    "REPORT_NAME", "analytic_filter_efficiency", "describe_filter", "generate", "generate_events",
]

DEFAULT_EVENTS_PER_FILE = 5000
DEFAULT_FILES_PER_SAMPLE = 1
#: Events generated and written per ``extend`` call: bounds memory for big files. Part of the seeding scheme.
CHUNK_SIZE = 50_000

_ETA_PT0 = 22756.0  # ROOT's eta for a vector with pT = 0 is +-(22756 + |pz|)
_M_B, _M_C, _M_E, _M_MU, _M_TAU = 4.8, 1.5, 0.000511, 0.10566, 1.777
_F32 = np.float32

# GenPart_statusFlags as in NanoAOD: isPrompt | isHardProcess | fromHardProcess | isFirstCopy | isLastCopy
_FLAGS_INCOMING = 10625
_FLAGS_INTERMEDIATE = 4481
_FLAGS_LAST_COPY = 10497
_FLAGS_FINAL = 12673

#: W decay modes: e nu, mu nu, tau nu, u dbar, c sbar (PDG: 10.8 % per lepton flavour, 67.6 % hadronic).
_W_BR_INCLUSIVE = np.array([0.108, 0.108, 0.108, 0.338, 0.338])
_W_BR_LEPTONIC = np.array([1.0, 1.0, 1.0, 0.0, 0.0]) / 3.0
_W_D1_ID = np.array([11, 13, 15, 2, 4])  # charged lepton or up-type quark
_W_D2_ID = np.array([12, 14, 16, 1, 3])  # neutrino or down-type quark
_W_D1_MASS = np.array([_M_E, _M_MU, _M_TAU, 0.0, _M_C])

#: Electron cut-based ID working points cap the ID by relative isolation (tight, medium, loose, veto).
_ELE_ISO_WP = np.array([0.0588, 0.0695, 0.0994, 0.175])


@dataclass(frozen=True)
class Tune:
    """Knobs of the toy that the ttbar variations change; one instance per (process, variation)."""

    isr_mean: float = 2.5  # mean number of radiation partons (pT > 15 GeV) recoiling on the hard system
    isr_alpha: float = 1.4  # Pareto slope of their pT spectrum
    fsr_prob: float = 0.12  # probability that a hard parton radiates a separate jet
    mtt_shape: float = 1.6  # gamma-distributed excess of m(tt) above threshold: shape ...
    mtt_scale: float = 95.0  # ... and scale (GeV)
    jet_res: float = 1.0  # scale factor on the jet energy resolution
    light_response: float = 1.0
    b_response: float = 0.99
    btag_b: tuple[float, float] = (2.6, 1.0)  # Beta(a, b) of CSVv2 for b jets
    neg_weight_frac: float = 0.0


_NOMINAL = Tune()
_TUNES: dict[tuple[str, str], Tune] = {
    ("ttbar", "scaleup"): replace(_NOMINAL, isr_mean=1.2 * _NOMINAL.isr_mean, fsr_prob=1.4 * _NOMINAL.fsr_prob),
    ("ttbar", "scaledown"): replace(_NOMINAL, isr_mean=0.8 * _NOMINAL.isr_mean, fsr_prob=0.7 * _NOMINAL.fsr_prob),
    ("ttbar", "ME_var"): replace(
        _NOMINAL, mtt_scale=0.9 * _NOMINAL.mtt_scale, isr_mean=1.05 * _NOMINAL.isr_mean, neg_weight_frac=0.28
    ),
    ("ttbar", "PS_var"): replace(
        _NOMINAL, jet_res=1.15, b_response=_NOMINAL.b_response - 0.015,
        light_response=_NOMINAL.light_response - 0.01, btag_b=(2.7, 1.1), fsr_prob=1.25 * _NOMINAL.fsr_prob
    ),
    ("single_top_s_chan", "nominal"): replace(_NOMINAL, neg_weight_frac=0.19),
}


def tune_for(process: str, variation: str) -> Tune:
    """The tune of a sample: nominal unless it is one of the ttbar systematic samples."""
    return _TUNES.get((process, variation), _NOMINAL)


# --- four-vector helpers (arrays of shape (n, 4) holding E, px, py, pz; float64) ---------------------------------


def _p4(pt: Any, eta: Any, phi: Any, mass: Any) -> np.ndarray:
    pt, eta, phi, mass = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (pt, eta, phi, mass)))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    return np.stack([np.sqrt(px**2 + py**2 + pz**2 + mass**2), px, py, pz], axis=-1)


def _pt_eta_phi(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pt = np.hypot(p[:, 1], p[:, 2])
    return pt, np.arcsinh(p[:, 3] / np.maximum(pt, 1e-9)), np.arctan2(p[:, 2], p[:, 1])


def _mass(p: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(p[:, 0] ** 2 - p[:, 1] ** 2 - p[:, 2] ** 2 - p[:, 3] ** 2, 0.0))


def _boost(p: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Lorentz-boost the four-vectors ``p`` by the velocities ``beta`` (shape (n, 3))."""
    b2 = np.sum(beta**2, axis=1)
    gamma = 1.0 / np.sqrt(1.0 - b2)
    bp = np.sum(beta * p[:, 1:], axis=1)
    g2 = np.where(b2 > 0, (gamma - 1.0) / np.where(b2 > 0, b2, 1.0), 0.0)
    out = np.empty_like(p)
    out[:, 0] = gamma * (p[:, 0] + bp)
    out[:, 1:] = p[:, 1:] + (g2 * bp + gamma * p[:, 0])[:, None] * beta
    return out


def _decay2(
    parent: np.ndarray, m1: Any, m2: Any, rng: np.random.Generator, cos_theta: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two-body decay, isotropic in the parent rest frame unless ``cos_theta`` (w.r.t. the z axis) is given."""
    n = len(parent)
    big_m = _mass(parent)
    m1 = np.broadcast_to(np.asarray(m1, dtype=np.float64), (n,))
    m2 = np.broadcast_to(np.asarray(m2, dtype=np.float64), (n,))
    pstar2 = (big_m**2 - (m1 + m2) ** 2) * (big_m**2 - (m1 - m2) ** 2)
    pstar = np.sqrt(np.maximum(pstar2, 0.0)) / (2.0 * big_m)
    cos = rng.uniform(-1.0, 1.0, n) if cos_theta is None else cos_theta
    sin = np.sqrt(np.maximum(1.0 - cos**2, 0.0))
    phi = rng.uniform(-np.pi, np.pi, n)
    d = np.stack([pstar * sin * np.cos(phi), pstar * sin * np.sin(phi), pstar * cos], axis=1)
    d1 = np.concatenate([np.sqrt(pstar**2 + m1**2)[:, None], d], axis=1)
    d2 = np.concatenate([np.sqrt(pstar**2 + m2**2)[:, None], -d], axis=1)
    beta = parent[:, 1:] / parent[:, :1]
    return _boost(d1, beta), _boost(d2, beta)


def _breit_wigner(rng: np.random.Generator, m0: float, width: float, n: int, lo: Any, hi: Any) -> np.ndarray:
    """Masses from a Breit-Wigner (Cauchy) line shape truncated to [lo, hi]."""
    a = np.arctan(2.0 * (np.asarray(lo, dtype=np.float64) - m0) / width)
    b = np.arctan(2.0 * (np.asarray(hi, dtype=np.float64) - m0) / width)
    return m0 + 0.5 * width * np.tan(rng.uniform(a, b, n))


def _system(mass: np.ndarray, px: np.ndarray, py: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Four-vector of a system with given mass, transverse momentum and rapidity."""
    mt = np.sqrt(mass**2 + px**2 + py**2)
    return np.stack([mt * np.cosh(y), px, py, mt * np.sinh(y)], axis=1)


def _reduce_precision(x: np.ndarray, bits: int) -> np.ndarray:
    """Round to ``bits`` mantissa bits as NanoAOD stores b-tag and q/g scores (so e.g. exactly 0.5 occurs)."""
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e)


# --- truth record -------------------------------------------------------------------------------------------------


@dataclass
class _Truth:
    """Generator-level content of a chunk: the GenPart table plus flat lists of what the detector sees."""

    n: int
    gen_cols: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    partons: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # (evt, pt, eta, phi, pdgId, hard)
    leptons: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # (evt, pt, eta, phi, pdgId, from_tau)
    taujets: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # (evt, pt, eta, phi)
    inv_px: np.ndarray = field(init=False)
    inv_py: np.ndarray = field(init=False)
    n_hard_radiation: np.ndarray = field(init=False)  # radiation partons above FILTER_PT, per event

    def __post_init__(self) -> None:
        self.inv_px = np.zeros(self.n)
        self.inv_py = np.zeros(self.n)
        self.n_hard_radiation = np.zeros(self.n, np.int64)

    def _full(self, x: Any, dtype: Any) -> np.ndarray:
        return np.broadcast_to(np.asarray(x, dtype=dtype), (self.n,))

    def take(self, keep: np.ndarray) -> _Truth:
        """The events ``keep`` (increasing indices) of this record, renumbered from 0."""
        index = np.full(self.n, -1, np.int64)
        index[keep] = np.arange(len(keep))
        out = _Truth(len(keep))
        out.gen_cols = [tuple(c[keep] for c in cols) for cols in self.gen_cols]
        for name in ("partons", "leptons", "taujets"):
            entries = []
            for evt, *rest in getattr(self, name):
                new = index[evt]
                sel = new >= 0
                entries.append((new[sel], *(x[sel] for x in rest)))
            setattr(out, name, entries)
        out.inv_px, out.inv_py = self.inv_px[keep], self.inv_py[keep]
        out.n_hard_radiation = self.n_hard_radiation[keep]
        return out

    @staticmethod
    def concat(parts: Sequence[_Truth]) -> _Truth:
        """One record of all events of ``parts`` (made by the same process code, so with the same layout)."""
        if len(parts) == 1:
            return parts[0]
        out = _Truth(sum(t.n for t in parts))
        offsets = np.cumsum([0] + [t.n for t in parts[:-1]])
        out.gen_cols = [tuple(np.concatenate(cs) for cs in zip(*slots, strict=True))
                        for slots in zip(*(t.gen_cols for t in parts), strict=True)]
        for name in ("partons", "leptons", "taujets"):
            merged = []
            for entries in zip(*(getattr(t, name) for t in parts), strict=True):
                evt = np.concatenate([e[0] + off for e, off in zip(entries, offsets, strict=True)])
                merged.append((evt, *(np.concatenate(cs) for cs in zip(*(e[1:] for e in entries), strict=True))))
            setattr(out, name, merged)
        out.inv_px = np.concatenate([t.inv_px for t in parts])
        out.inv_py = np.concatenate([t.inv_py for t in parts])
        out.n_hard_radiation = np.concatenate([t.n_hard_radiation for t in parts])
        return out

    def count_jets(self, pt_min: float, abs_eta_max: float) -> np.ndarray:
        """Generator-level jets per event within pT and |eta| limits: partons (hard process, W daughters,
        radiation, FSR) and the visible part of hadronic taus.
        """
        evt = np.concatenate([_cat(self.partons, 0, np.int64), _cat(self.taujets, 0, np.int64)])
        pt = np.concatenate([_cat(self.partons, 1), _cat(self.taujets, 1)])
        eta = np.concatenate([_cat(self.partons, 2), _cat(self.taujets, 2)])
        ok = (pt > pt_min) & (np.abs(eta) < abs_eta_max)
        return np.bincount(evt[ok], minlength=self.n)

    def count_leptons(self, pt_min: float, abs_eta_max: float) -> np.ndarray:
        """Generator-level electrons and muons (from W, or from W -> tau) per event within pT and |eta| limits."""
        evt = _cat(self.leptons, 0, np.int64)
        ok = (_cat(self.leptons, 1) > pt_min) & (np.abs(_cat(self.leptons, 2)) < abs_eta_max)
        return np.bincount(evt[ok], minlength=self.n)

    def add_gen(self, p: np.ndarray, pdg: Any, mother: int, status: Any, flags: int, mass: Any = None) -> int:
        """Append one GenPart slot (one particle per event); returns its row index."""
        pt, eta, phi = _pt_eta_phi(p)
        m = _mass(p) if mass is None else self._full(mass, np.float64)
        self.gen_cols.append(
            (pt, eta, phi, m, self._full(pdg, np.int32), self._full(mother, np.int32),
             self._full(status, np.int32), self._full(flags, np.int32))
        )
        return len(self.gen_cols) - 1

    def add_incoming(self, pz: np.ndarray, pdg: Any) -> int:
        zero = np.zeros(self.n)
        eta = np.sign(pz) * (_ETA_PT0 + np.abs(pz))
        self.gen_cols.append(
            (zero, eta, zero, zero, self._full(pdg, np.int32), self._full(-1, np.int32),
             self._full(21, np.int32), self._full(_FLAGS_INCOMING, np.int32))
        )
        return len(self.gen_cols) - 1

    def add_partons(self, p: np.ndarray, pdg: Any, mask: np.ndarray | None = None, hard: bool = True) -> None:
        idx = np.arange(self.n) if mask is None else np.flatnonzero(mask)
        pt, eta, phi = _pt_eta_phi(p[idx])
        self.partons.append(
            (idx, pt, eta, phi, self._full(pdg, np.int32)[idx], np.full(len(idx), hard))
        )

    def add_lepton(self, p: np.ndarray, pdg: Any, mask: np.ndarray, from_tau: bool) -> None:
        idx = np.flatnonzero(mask)
        pt, eta, phi = _pt_eta_phi(p[idx])
        self.leptons.append((idx, pt, eta, phi, self._full(pdg, np.int32)[idx], np.full(len(idx), from_tau)))

    def add_invisible(self, p: np.ndarray, mask: np.ndarray) -> None:
        self.inv_px += np.where(mask, p[:, 1], 0.0)
        self.inv_py += np.where(mask, p[:, 2], 0.0)

    def hard_system(self, inc1: Any, inc2: Any, system: np.ndarray) -> tuple[int, int]:
        """Add the two incoming partons carrying the light-cone momenta of ``system``."""
        i1 = self.add_incoming(0.5 * (system[:, 0] + system[:, 3]), inc1)
        i2 = self.add_incoming(-0.5 * (system[:, 0] - system[:, 3]), inc2)
        return i1, i2


@dataclass(frozen=True)
class Radiation:
    """Extra partons (initial/final-state radiation, the Berends staircase of W+jets) recoiling on the hard system.

    Partons have pT > 15 GeV (a Pareto spectrum of slope ``alpha``). Those above :data:`FILTER_PT` are *hard*:
    they make the jets that lift an event into the >= 4-jet regions, and the generator-level filters count
    them. Their number is Poisson (mean ``mean`` times the Pareto tail above :data:`FILTER_PT`) or, with
    ``staircase``, geometric (each extra hard parton costs a factor ``staircase``, as W+n-jet cross sections
    do); the softer ones are Poisson. Hard and soft counts are independent, so conditioning on ``min_hard``
    hard partons is exactly the unfiltered model restricted to the events that pass, with a known efficiency.
    """

    mean: float  # mean number of partons above 15 GeV (Poisson model) ...
    alpha: float
    staircase: float | None = None  # ... or: P(n_hard >= k) = staircase**k, plus ``mean`` soft partons
    min_hard: int = 0  # the generator-level filter: at least this many hard partons
    eta_sigma: float = 1.9  # Gaussian spread of their pseudorapidity

    @property
    def hard_fraction(self) -> float:
        """Probability that a parton above 15 GeV is above :data:`FILTER_PT` (the Pareto tail)."""
        return float((_RADIATION_PT_MIN / FILTER_PT) ** self.alpha)

    def _soft_mean(self) -> float:
        return self.mean if self.staircase is not None else self.mean * (1.0 - self.hard_fraction)

    def _hard_mean(self) -> float:
        return self.mean * self.hard_fraction

    def efficiency(self) -> float:
        """Fraction of unfiltered events with at least ``min_hard`` hard partons."""
        if self.min_hard <= 0:
            return 1.0
        if self.staircase is not None:
            return float(self.staircase**self.min_hard)
        return float(1.0 - _poisson_cdf(self._hard_mean(), self.min_hard - 1))

    def counts(self, rng: np.random.Generator, n: int, filtered: bool) -> tuple[np.ndarray, np.ndarray]:
        """(hard, soft) parton counts per event; with ``filtered``, hard counts are drawn given >= ``min_hard``."""
        k = self.min_hard if filtered else 0
        if self.staircase is not None:
            hard = k + rng.geometric(1.0 - self.staircase, n) - 1
        else:
            hard = _poisson_at_least(rng, self._hard_mean(), n, k)
        return hard, rng.poisson(self._soft_mean(), n)


#: Radiation partons above this pT are "hard" (and counted by the generator-level filters), GeV.
FILTER_PT = 30.0
_RADIATION_PT_MIN = 15.0
_RADIATION_PT_MAX = 800.0


def _poisson_cdf(mean: float, k: int) -> float:
    """P(X <= k) for X ~ Poisson(mean)."""
    term = total = math.exp(-mean)
    for j in range(1, k + 1):
        term *= mean / j
        total += term
    return total


def _poisson_at_least(rng: np.random.Generator, mean: float, n: int, k: int) -> np.ndarray:
    """Poisson(mean) counts conditioned on >= k, by inverting the CDF on [F(k - 1), 1)."""
    if k <= 0:
        return rng.poisson(mean, n)
    top = int(mean + 12.0 * math.sqrt(mean) + 20 + k)
    cdf = np.array([_poisson_cdf(mean, j) for j in range(top)])
    u = rng.uniform(cdf[k - 1], 1.0, n)
    return np.minimum(np.searchsorted(cdf, u, side="right"), top).astype(np.int64)


def _radiation(truth: _Truth, rng: np.random.Generator, model: Radiation, flavour_p: Sequence[float],
               filtered: bool) -> tuple[np.ndarray, np.ndarray]:
    """Radiation partons added as jet sources; returns their summed px, py (the hard system recoils)."""
    n = truth.n
    hard, soft = model.counts(rng, n, filtered)
    truth.n_hard_radiation = hard
    evt = np.concatenate([np.repeat(np.arange(n), hard), np.repeat(np.arange(n), soft)])
    is_hard = np.repeat([True, False], [int(hard.sum()), int(soft.sum())])
    m = len(evt)
    # Pareto by inversion: u in [0, 1 - q) gives 15 GeV <= pT < FILTER_PT, u in [1 - q, 1) the hard tail
    q = model.hard_fraction
    u = np.where(is_hard, 1.0 - q * rng.random(m), (1.0 - q) * rng.random(m))
    pt = np.minimum(_RADIATION_PT_MIN * (1.0 - u) ** (-1.0 / model.alpha), _RADIATION_PT_MAX)
    pt = np.where(is_hard, np.maximum(pt, FILTER_PT), np.minimum(pt, FILTER_PT))
    order = np.argsort(evt, kind="stable")
    evt, pt = evt[order], pt[order]
    eta = rng.normal(0.0, model.eta_sigma, m)
    phi = rng.uniform(-np.pi, np.pi, m)
    # flavour: gluon, light quark, c, b (from g -> cc, bb)
    kind = rng.choice(4, m, p=np.asarray(flavour_p))
    sign = np.where(rng.random(m) < 0.5, 1, -1)
    pdg = np.select([kind == 0, kind == 1, kind == 2], [21, sign * rng.integers(1, 4, m), sign * 4], sign * 5)
    truth.partons.append((evt, pt, eta, phi, pdg.astype(np.int32), np.zeros(m, bool)))
    px = np.bincount(evt, weights=pt * np.cos(phi), minlength=n)
    py = np.bincount(evt, weights=pt * np.sin(phi), minlength=n)
    return px, py


_ISR_FLAVOURS = (0.72, 0.235, 0.03, 0.015)
_WJETS_FLAVOURS = (0.5, 0.37, 0.08, 0.05)


def _decay_w(truth: _Truth, rng: np.random.Generator, iw: int, w: np.ndarray, sign: np.ndarray,
             modes: np.ndarray) -> None:
    """W -> l nu / q qbar' with GenPart entries, jet sources, leptons, tau decays and neutrinos."""
    n = truth.n
    m1 = _W_D1_MASS[modes]
    d1, d2 = _decay2(w, m1, 0.0, rng)
    had = modes >= 3
    pdg1 = np.where(had, sign * _W_D1_ID[modes], -sign * _W_D1_ID[modes])
    pdg2 = np.where(had, -sign * _W_D2_ID[modes], sign * _W_D2_ID[modes])
    tau = modes == 2
    truth.add_gen(d1, pdg1, iw, np.where(had, 23, np.where(tau, 2, 1)),
                  _FLAGS_FINAL, mass=np.where(had, m1 * (modes == 4), m1))
    truth.add_gen(d2, pdg2, iw, np.where(had, 23, 1), _FLAGS_FINAL, mass=0.0)
    truth.add_partons(d1, pdg1, had)
    truth.add_partons(d2, pdg2, had)
    truth.add_lepton(d1, pdg1, modes < 2, from_tau=False)
    truth.add_invisible(d2, ~had)
    # tau -> e nu nu (17.8 %), mu nu nu (17.4 %), hadrons nu (64.8 %); collinear decay
    r = rng.random(n)
    tau_e, tau_mu = tau & (r < 0.178), tau & (r >= 0.178) & (r < 0.352)
    tau_h = tau & (r >= 0.352)
    x = np.where(tau_h, rng.beta(3.0, 1.6, n), rng.beta(2.0, 2.2, n))
    visible = d1 * x[:, None]
    lep_pdg = np.where(tau_e, 11, 13) * -sign
    truth.add_lepton(visible, lep_pdg, tau_e | tau_mu, from_tau=True)
    idx = np.flatnonzero(tau_h)
    pt, eta, phi = _pt_eta_phi(visible[idx])
    truth.taujets.append((idx, pt, eta, phi))
    truth.add_invisible(d1 * (1.0 - x)[:, None], tau)


def _decay_top(truth: _Truth, rng: np.random.Generator, it: int, top: np.ndarray, sign: np.ndarray,
               modes: np.ndarray) -> None:
    """T -> b W with a Breit-Wigner W mass, then the W decay."""
    mt = _mass(top)
    mw = _breit_wigner(rng, W_MASS, W_WIDTH, truth.n, 50.0, mt - _M_B - 0.5)
    b, w = _decay2(top, _M_B, mw, rng)
    truth.add_gen(b, 5 * sign, it, 23, _FLAGS_INTERMEDIATE, mass=_M_B)
    iw = truth.add_gen(w, 24 * sign, it, 22, _FLAGS_INTERMEDIATE)
    truth.add_partons(b, 5 * sign)
    _decay_w(truth, rng, iw, w, sign, modes)


def _top_masses(rng: np.random.Generator, n: int) -> np.ndarray:
    return _breit_wigner(rng, TOP_MASS, TOP_WIDTH, n, TOP_MASS - 25.0, TOP_MASS + 25.0)


def _w_modes(rng: np.random.Generator, n: int, leptonic: bool) -> np.ndarray:
    return rng.choice(5, n, p=_W_BR_LEPTONIC if leptonic else _W_BR_INCLUSIVE)


#: BR(W -> l nu) summed over e, mu, tau: the efficiency of a one-W lepton filter.
_W_BR_L = float(_W_BR_INCLUSIVE[:3].sum())
#: Efficiency of a two-W lepton filter (at least one of the two W decays to l nu).
_TWO_W_LEPTON_EFF = 1.0 - (1.0 - _W_BR_L) ** 2


def _w_mode_pair(rng: np.random.Generator, n: int, filtered: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decay modes of two W bosons, inclusive; with ``filtered`` drawn given that at least one is leptonic."""
    joint = np.outer(_W_BR_INCLUSIVE, _W_BR_INCLUSIVE)
    if filtered:
        joint[3:, 3:] = 0.0
    flat = rng.choice(joint.size, n, p=(joint / joint.sum()).ravel())
    return flat // 5, flat % 5


# --- hard processes -----------------------------------------------------------------------------------------------
#
# Generator-level filters make the samples efficient: like real filtered MC, a sample only contains events that
# pass, and its catalogue cross section is sigma x filter efficiency (:func:`analytic_filter_efficiency` times the kinematic part), so the weight
# xsec x lumi / nevts stays right. The filters act on quantities drawn from known distributions (W decay modes,
# the number of hard radiation partons), so each efficiency is exact; they drop only events that the >= 4-jet,
# one-lepton selection (almost) never keeps.

#: Radiation models (mean, Pareto slope, staircase, filter) per process; ttbar's mean and slope come from the tune.
_RADIATION: dict[str, Radiation] = {
    "single_top_s_chan": Radiation(mean=0.6, alpha=1.6),
    "single_top_t_chan": Radiation(mean=0.6, alpha=1.6),
    "single_top_tW": Radiation(mean=1.3, alpha=1.6),
    "wjets": Radiation(mean=1.5, alpha=1.4, staircase=0.23, min_hard=3, eta_sigma=1.4),
}
#: The kinematic filter counts generator-level jets (partons, hadronic taus) above this pT (GeV) ...
KIN_FILTER_PT = 20.0
#: ... and below this |eta|: looser than the jets the analysis selects (pT > 30 GeV, |eta| < 2.4);
KIN_FILTER_ETA = 2.7
#: leptons (e, mu, also from tau decays) count above this pT (GeV) and below this |eta| (analysis: 30, 2.1).
KIN_FILTER_LEPTON = (25.0, 2.3)


@dataclass(frozen=True)
class Filter:
    """A sample's generator-level filter.

    ``lepton_ws``: 1 keeps the events whose one W decays to l nu (e, mu, tau), 2 those where at least one of the
    two W does; drawn directly from the conditioned branching fractions (exact efficiency). The kinematic
    part: at least ``min_jets`` generator-level jets (see :data:`KIN_FILTER_PT`) and, with ``lepton``, one
    electron or muon in the acceptance of :data:`KIN_FILTER_LEPTON`. Events are generated and tested until
    enough pass; that efficiency is the number kept over the number tried. ``batch_efficiency`` only sizes
    the batches of trials.
    """

    lepton_ws: int = 0
    min_jets: int = 0
    lepton: bool = False
    batch_efficiency: float = 1.0

    @property
    def kinematic(self) -> bool:
        return self.min_jets > 0 or self.lepton

    def passes(self, truth: _Truth) -> np.ndarray:
        """Which events of ``truth`` pass the kinematic part."""
        ok = truth.count_jets(KIN_FILTER_PT, KIN_FILTER_ETA) >= self.min_jets
        if self.lepton:
            ok &= truth.count_leptons(*KIN_FILTER_LEPTON) >= 1
        return ok

    def describe(self, radiation: Radiation) -> str:
        parts = {1: ["W -> l nu"], 2: [">= 1 W -> l nu"]}.get(self.lepton_ws, [])
        if radiation.min_hard:
            parts.append(f">= {radiation.min_hard} radiation partons with pT > {FILTER_PT:g} GeV")
        if self.lepton:
            parts.append(f"an e or mu with pT > {KIN_FILTER_LEPTON[0]:g} GeV, |eta| < {KIN_FILTER_LEPTON[1]:g}")
        if self.min_jets:
            parts.append(f">= {self.min_jets} generator jets with pT > {KIN_FILTER_PT:g} GeV, "
                         f"|eta| < {KIN_FILTER_ETA:g}")
        return "; ".join(parts) or "none"


_FILTERS: dict[str, Filter] = {
    "ttbar": Filter(lepton_ws=2, min_jets=4, lepton=True, batch_efficiency=0.38),
    "single_top_s_chan": Filter(min_jets=3, lepton=True, batch_efficiency=0.2),
    "single_top_t_chan": Filter(lepton_ws=1, min_jets=4, lepton=True, batch_efficiency=0.09),
    "single_top_tW": Filter(lepton_ws=2, min_jets=4, lepton=True, batch_efficiency=0.32),
    "wjets": Filter(min_jets=4, lepton=True, batch_efficiency=0.26),
}


def _radiation_model(process: str, tune: Tune) -> Radiation:
    if process == "ttbar":
        return Radiation(mean=tune.isr_mean, alpha=tune.isr_alpha)
    return _RADIATION[process]


def analytic_filter_efficiency(process: str, variation: str = "nominal") -> float:
    """The exactly known part of a sample's filter efficiency: lepton decay modes and radiation counts."""
    if process not in _PROCESSES:
        raise ValueError(f"no generator for process '{process}' (known: {', '.join(_PROCESSES)})")
    lepton = {1: _W_BR_L, 2: _TWO_W_LEPTON_EFF}.get(_FILTERS[process].lepton_ws, 1.0)
    return lepton * _radiation_model(process, tune_for(process, variation)).efficiency()


def describe_filter(process: str, variation: str = "nominal") -> str:
    """The generator-level filter of a sample in words."""
    return _FILTERS[process].describe(_radiation_model(process, tune_for(process, variation)))


def _final_state_radiation(truth: _Truth, rng: np.random.Generator, fsr_prob: float) -> None:
    """Hard-process partons radiate a separate gluon jet with probability ``fsr_prob`` (part of the truth, so
    that the kinematic filter sees the jets it makes).
    """
    evt = _cat(truth.partons, 0, np.int64)
    pt = _cat(truth.partons, 1)
    eta = _cat(truth.partons, 2)
    phi = _cat(truth.partons, 3)
    pdg = _cat(truth.partons, 4, np.int32)
    hard = _cat(truth.partons, 5, bool)
    m = len(evt)
    split = hard & (rng.random(m) < fsr_prob)
    z = np.where(split, rng.uniform(0.55, 0.9, m), 1.0)
    dr, alpha = rng.uniform(0.5, 1.3, m), rng.uniform(-np.pi, np.pi, m)
    k = int(split.sum())
    truth.partons = [
        (evt, pt * z, eta, phi, pdg, hard),
        (evt[split], (pt * (1.0 - z))[split], (eta + dr * np.cos(alpha))[split],
         _delta_phi(phi + dr * np.sin(alpha))[split], np.full(k, 21, np.int32), np.zeros(k, bool)),
    ]


def _generate_truth(process: str, tune: Tune, n: int, rng: np.random.Generator,
                    filtered: bool) -> tuple[_Truth, int]:
    """Truth records of ``n`` events passing the sample's filter, and how many were tried for them.

    The analytic parts of the filter are built into the draws; the kinematic part is applied to batches of
    trials until ``n`` events pass (trials after the n-th passing event are not counted).
    """
    spec = _FILTERS[process]
    make = _PROCESSES[process]
    if not filtered or not spec.kinematic:
        truth = _Truth(n)
        make(truth, rng, tune, filtered)
        _final_state_radiation(truth, rng, tune.fsr_prob)
        return truth, n
    parts: list[_Truth] = []
    have = tried = 0
    while have < n:
        need = n - have
        size = max(int(need / spec.batch_efficiency * 1.2) + 16, 256)
        batch = _Truth(size)
        make(batch, rng, tune, True)
        _final_state_radiation(batch, rng, tune.fsr_prob)
        passed = np.flatnonzero(spec.passes(batch))
        if len(passed) >= need:
            passed = passed[:need]
            tried += int(passed[-1]) + 1
        else:
            tried += size
        parts.append(batch.take(passed))
        have += len(passed)
    return _Truth.concat(parts), tried


_TTBAR_Y_SIGMA = 1.6  # rapidity spread of the top pair


def _ttbar(truth: _Truth, rng: np.random.Generator, tune: Tune, filtered: bool) -> None:
    n = truth.n
    px, py = _radiation(truth, rng, _radiation_model("ttbar", tune), _ISR_FLAVOURS, filtered)
    m1, m2 = _top_masses(rng, n), _top_masses(rng, n)
    system = _system(m1 + m2 + rng.gamma(tune.mtt_shape, tune.mtt_scale, n), -px, -py,
                     rng.normal(0, _TTBAR_Y_SIGMA, n))
    qq = rng.random(n) < 0.1  # ~10 % q qbar -> tt at 13 TeV, the rest gg
    i1, _ = truth.hard_system(np.where(qq, 2, 21), np.where(qq, -2, 21), system)
    top, antitop = _decay2(system, m1, m2, rng)
    plus, minus = np.ones(n, np.int32), -np.ones(n, np.int32)
    it = truth.add_gen(top, 6, i1, 62, _FLAGS_LAST_COPY)
    itb = truth.add_gen(antitop, -6, i1, 62, _FLAGS_LAST_COPY)
    modes_t, modes_tbar = _w_mode_pair(rng, n, filtered)
    _decay_top(truth, rng, it, top, plus, modes_t)
    _decay_top(truth, rng, itb, antitop, minus, modes_tbar)


def _single_top_s(truth: _Truth, rng: np.random.Generator, tune: Tune, filtered: bool) -> None:
    n = truth.n
    sign = np.where(rng.random(n) < 2.0268 / 3.2944, 1, -1).astype(np.int32)
    px, py = _radiation(truth, rng, _RADIATION["single_top_s_chan"], _ISR_FLAVOURS, filtered)
    mt = _top_masses(rng, n)
    system = _system(mt + _M_B + rng.gamma(2.0, 90.0, n), -px, -py, rng.normal(0, 0.9, n))
    i1, _ = truth.hard_system(2 * sign, -1 * sign, system)  # u dbar -> W+* -> t bbar
    cos = 2.0 * rng.beta(2.0, 2.0, n) - 1.0
    top, bbar = _decay2(system, mt, _M_B, rng, cos)
    it = truth.add_gen(top, 6 * sign, i1, 62, _FLAGS_LAST_COPY)
    truth.add_gen(bbar, -5 * sign, i1, 23, _FLAGS_INTERMEDIATE, mass=_M_B)
    truth.add_partons(bbar, -5 * sign)
    # the catalogue's s-channel cross section is for leptonic top decays already
    _decay_top(truth, rng, it, top, sign, _w_modes(rng, n, leptonic=True))


_TCHAN_MASS_SCALE = 120.0  # GeV: scale of the gamma-distributed excess of the t + q mass over the top mass
_TCHAN_SPECTATOR_PT = (10.0, 28.0)  # GeV: offset and exponential slope of the spectator bbar


def _single_top_t(truth: _Truth, rng: np.random.Generator, tune: Tune, filtered: bool) -> None:
    n = truth.n
    sign = np.where(rng.random(n) < 36.993 / (36.993 + 22.175), 1, -1).astype(np.int32)
    px, py = _radiation(truth, rng, _RADIATION["single_top_t_chan"], _ISR_FLAVOURS, filtered)
    mt = _top_masses(rng, n)
    system = _system(mt + rng.gamma(1.8, _TCHAN_MASS_SCALE, n), -px, -py, rng.normal(0, 1.0, n))
    i1, i2 = truth.hard_system(2 * sign, 21, system)  # u g -> d t bbar (4 flavour scheme)
    # the recoiling light quark goes forward: the top is emitted close to the beam axis in the rest frame
    cos = np.where(rng.random(n) < 0.5, 1.0, -1.0) * (1.0 - np.minimum(rng.exponential(0.35, n), 2.0))
    top, quark = _decay2(system, mt, 0.0, rng, cos)
    it = truth.add_gen(top, 6 * sign, i1, 62, _FLAGS_LAST_COPY)
    truth.add_gen(quark, 1 * sign, i1, 23, _FLAGS_INTERMEDIATE, mass=0.0)
    truth.add_partons(quark, 1 * sign)
    spectator = _p4(_TCHAN_SPECTATOR_PT[0] + rng.exponential(_TCHAN_SPECTATOR_PT[1], n), rng.normal(0.0, 2.2, n),
                    rng.uniform(-np.pi, np.pi, n), _M_B)
    truth.add_gen(spectator, -5 * sign, i2, 23, _FLAGS_INTERMEDIATE, mass=_M_B)
    truth.add_partons(spectator, -5 * sign)
    # the catalogue's t-channel cross section is for inclusive top decays: the lepton filter keeps W -> l nu
    _decay_top(truth, rng, it, top, sign, _w_modes(rng, n, leptonic=filtered))


_TW_SPECTATOR_PT = (10.0, 22.0)  # GeV: offset and exponential slope of the spectator bbar


def _single_top_tw(truth: _Truth, rng: np.random.Generator, tune: Tune, filtered: bool) -> None:
    n = truth.n
    sign = np.where(rng.random(n) < 0.5, 1, -1).astype(np.int32)
    px, py = _radiation(truth, rng, _RADIATION["single_top_tW"], _ISR_FLAVOURS, filtered)
    mt = _top_masses(rng, n)
    mw = _breit_wigner(rng, W_MASS, W_WIDTH, n, 50.0, 130.0)
    system = _system(mt + mw + rng.gamma(1.8, 120.0, n), -px, -py, rng.normal(0, 0.9, n))
    i1, i2 = truth.hard_system(21, 5 * sign, system)  # g b -> t W-
    top, w = _decay2(system, mt, mw, rng)
    it = truth.add_gen(top, 6 * sign, i1, 62, _FLAGS_LAST_COPY)
    iw = truth.add_gen(w, -24 * sign, i1, 22, _FLAGS_INTERMEDIATE)
    modes_top, modes_w = _w_mode_pair(rng, n, filtered)
    _decay_top(truth, rng, it, top, sign, modes_top)
    _decay_w(truth, rng, iw, w, -sign, modes_w)
    # the initial b comes from a gluon splitting: its partner bbar recoils, soft and often forward
    spectator = _p4(_TW_SPECTATOR_PT[0] + rng.exponential(_TW_SPECTATOR_PT[1], n), rng.normal(0.0, 2.0, n),
                    rng.uniform(-np.pi, np.pi, n), _M_B)
    truth.add_gen(spectator, -5 * sign, i2, 23, _FLAGS_INTERMEDIATE, mass=_M_B)
    truth.add_partons(spectator, -5 * sign)


def _wjets(truth: _Truth, rng: np.random.Generator, tune: Tune, filtered: bool) -> None:
    n = truth.n
    sign = np.where(rng.random(n) < 0.58, 1, -1).astype(np.int32)
    px, py = _radiation(truth, rng, _RADIATION["wjets"], _WJETS_FLAVOURS, filtered)
    mw = _breit_wigner(rng, W_MASS, W_WIDTH, n, 50.0, 150.0)
    w = _system(mw, -px, -py, rng.normal(0, 1.7, n))
    i1, _ = truth.hard_system(np.where(sign > 0, 2, 1), np.where(sign > 0, -1, -2), w)
    iw = truth.add_gen(w, 24 * sign, i1, 62, _FLAGS_LAST_COPY)
    _decay_w(truth, rng, iw, w, sign, _w_modes(rng, n, leptonic=True))


_PROCESSES = {
    "ttbar": _ttbar,
    "single_top_s_chan": _single_top_s,
    "single_top_t_chan": _single_top_t,
    "single_top_tW": _single_top_tw,
    "wjets": _wjets,
}


# --- detector -----------------------------------------------------------------------------------------------------


def _cat(parts: Sequence[tuple[np.ndarray, ...]], i: int, dtype: Any = None) -> np.ndarray:
    arrays = [p[i] for p in parts]
    out = np.concatenate(arrays) if arrays else np.zeros(0)
    return out.astype(dtype) if dtype is not None else out


def _jagged(n: int, evt: np.ndarray, pt: np.ndarray, columns: dict[str, np.ndarray]) -> ak.Array:
    """Build a NanoAOD collection: objects grouped by event and pT-ordered (descending) within it."""
    order = np.lexsort((-pt, evt))
    counts = np.bincount(evt, minlength=n)
    record = ak.zip({k: v[order] for k, v in columns.items()}, depth_limit=1)
    return ak.unflatten(record, counts)


def _delta_phi(phi: np.ndarray) -> np.ndarray:
    return (phi + np.pi) % (2 * np.pi) - np.pi


def _choice(rng: np.random.Generator, probs: np.ndarray, m: int) -> np.ndarray:
    """Draw from a categorical distribution per object (``probs`` of shape (m, k) or (k,))."""
    cdf = np.cumsum(np.broadcast_to(probs, (m, probs.shape[-1])), axis=1)
    return (rng.random(m)[:, None] > cdf[:, :-1]).sum(axis=1)


_RECO_EFF_E, _RECO_EFF_MU = 0.45, 0.48  # reconstruction efficiency of prompt leptons


def _leptons(truth: _Truth, rng: np.random.Generator, np_parts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Reconstructed electrons and muons: prompt (W, W -> tau) and non-prompt (in jets) with ID, iso, sip3d."""
    n = truth.n
    evt = np.concatenate([_cat(truth.leptons, 0, np.int64), np_parts["evt"]])
    pt = np.concatenate([_cat(truth.leptons, 1), np_parts["pt"]])
    eta = np.concatenate([_cat(truth.leptons, 2), np_parts["eta"]])
    phi = np.concatenate([_cat(truth.leptons, 3), np_parts["phi"]])
    pdg = np.concatenate([_cat(truth.leptons, 4, np.int32), np_parts["pdg"]])
    from_tau = np.concatenate([_cat(truth.leptons, 5, bool), np.zeros(len(np_parts["evt"]), bool)])
    kind = np.concatenate([np.zeros(len(from_tau) - len(np_parts["evt"]), np.int8), np_parts["kind"]])
    kind[from_tau] = 1  # 0 prompt, 1 prompt via tau, 2 non-prompt heavy flavour, 3 fake from a light jet
    m = len(evt)
    is_e = np.abs(pdg) == 11
    prompt = kind <= 1
    # resolution and efficiency
    res = np.where(is_e, 0.02 + 0.01 * np.abs(eta), 0.012 + 0.00008 * pt)
    pt_reco = pt * (1.0 + res * rng.standard_normal(m))
    eta_reco = eta + rng.normal(0.0, 0.002, m)
    phi_reco = _delta_phi(phi + rng.normal(0.0, 0.002, m))
    eff = np.where(is_e, _RECO_EFF_E, _RECO_EFF_MU) * np.where(prompt, 1.0, 0.95)
    keep = (
        (rng.random(m) < eff)
        & np.where(is_e, (np.abs(eta_reco) < 2.5) & (pt_reco > 5.0), (np.abs(eta_reco) < 2.4) & (pt_reco > 3.0))
    )
    # isolation: prompt leptons mostly isolated, a tail from nearby jets; non-prompt ones sit inside jets
    iso_prompt = np.where(rng.random(m) < 0.85, rng.exponential(0.02, m), rng.exponential(0.15, m))
    iso_np = np.where(rng.random(m) < 0.01, rng.exponential(0.05, m), 0.1 + rng.exponential(0.5, m))
    iso = np.where(prompt, iso_prompt, iso_np)
    # 3D impact-parameter significance: Rayleigh for prompt tracks, displaced for tau and b/c decays
    sip_prompt = np.where(rng.random(m) < 0.93, rng.rayleigh(0.9, m), rng.exponential(3.0, m))
    sip = np.select(
        [kind == 0, kind == 1, kind == 2],
        [sip_prompt, rng.rayleigh(2.0, m), 1.0 + rng.exponential(5.0, m)],
        rng.rayleigh(1.5, m) + rng.exponential(1.0, m),
    )
    # electron cut-based ID (0 fail .. 4 tight), capped by the isolation the working points require
    base = _choice(rng, np.where(prompt[:, None], [[0.04, 0.04, 0.08, 0.18, 0.66]],
                                 [[0.35, 0.2, 0.2, 0.13, 0.12]]), m)
    cut_based = np.minimum(base, 4 - np.searchsorted(_ELE_ISO_WP, iso, side="right")).astype(np.int32)
    tight_id = rng.random(m) < np.select([prompt, kind == 2], [0.90, 0.75], 0.3)
    charge = np.where(pdg > 0, -1, 1).astype(np.int32)
    out: dict[str, Any] = {}
    for name, sel, mass in (("Electron", keep & is_e, _M_E), ("Muon", keep & ~is_e, _M_MU)):
        cols: dict[str, np.ndarray] = {
            "pt": pt_reco[sel].astype(_F32),
            "eta": eta_reco[sel].astype(_F32),
            "phi": phi_reco[sel].astype(_F32),
            "mass": np.full(int(sel.sum()), mass, _F32),
            "charge": charge[sel],
            "pdgId": pdg[sel].astype(np.int32),
        }
        if name == "Electron":
            cols |= {"cutBased": cut_based[sel], "sip3d": sip[sel].astype(_F32),
                     "pfRelIso03_all": iso[sel].astype(_F32)}
        else:
            cols |= {"tightId": tight_id[sel], "sip3d": sip[sel].astype(_F32),
                     "pfRelIso03_all": (iso[sel] * rng.uniform(0.7, 1.0, int(sel.sum()))).astype(_F32),
                     "pfRelIso04_all": iso[sel].astype(_F32)}
        out[name] = _jagged(n, evt[sel], pt_reco[sel], cols)
        out[f"_{name}_lepjets"] = (evt[sel & prompt], pt_reco[sel & prompt], eta_reco[sel & prompt],
                                   phi_reco[sel & prompt])
    out["_sum_pt"] = np.bincount(evt[keep], weights=pt_reco[keep], minlength=n)
    return out


def _detector(truth: _Truth, rng: np.random.Generator, tune: Tune) -> dict[str, Any]:
    """Turn the truth record into reconstructed NanoAOD collections."""
    n = truth.n
    npvs = rng.poisson(11.0, n) + 1
    # hard and radiation partons (hard FSR already split off, see _final_state_radiation)
    evt = _cat(truth.partons, 0, np.int64)
    pt = _cat(truth.partons, 1)
    eta = _cat(truth.partons, 2)
    phi = _cat(truth.partons, 3)
    pdg = _cat(truth.partons, 4, np.int32)
    m = len(evt)
    # semileptonic heavy-flavour decays (and fakes from light jets) give non-prompt leptons inside the jet
    apdg = np.abs(pdg)
    hflav = np.select([apdg == 5, apdg == 4], [5, 4], 0)
    r = rng.random(m)
    p_e = np.select([hflav == 5, hflav == 4], [0.11, 0.08], 0.012)
    p_mu = np.select([hflav == 5, hflav == 4], [0.11, 0.08], 0.004)
    lep_e, lep_mu = r < p_e, (r >= p_e) & (r < p_e + p_mu)
    has_lep = lep_e | lep_mu
    zl = rng.beta(2.0, 6.0, m)
    nu_frac = np.where(has_lep & (hflav > 0), np.minimum(zl * rng.uniform(0.5, 1.2, m), 0.6), 0.0)
    dr_l, a_l = np.abs(rng.normal(0.0, 0.08, m)), rng.uniform(-np.pi, np.pi, m)
    np_parts = {
        "evt": evt[has_lep], "pt": (pt * zl)[has_lep], "eta": (eta + dr_l * np.cos(a_l))[has_lep],
        "phi": _delta_phi(phi + dr_l * np.sin(a_l))[has_lep],
        "pdg": (np.where(lep_e, 11, 13) * np.where(rng.random(m) < 0.5, 1, -1))[has_lep].astype(np.int32),
        "kind": np.where(hflav > 0, 2, 3)[has_lep].astype(np.int8),
    }
    lep = _leptons(truth, rng, np_parts)
    nu_pt = pt * nu_frac
    inv_px = truth.inv_px + np.bincount(evt, weights=nu_pt * np.cos(phi), minlength=n)
    inv_py = truth.inv_py + np.bincount(evt, weights=nu_pt * np.sin(phi), minlength=n)
    pt = pt - nu_pt
    # jet sources: 0 partons (FSR included), 2 hadronic taus, 3 electrons and 4 muons (PF leptons are clustered into
    # jets too; those fail the lepton veto of the jet ID), 5 pile-up jets
    n_pu = rng.poisson(0.1 * npvs)
    pu_evt = np.repeat(np.arange(n), n_pu)
    k = len(pu_evt)
    sources: list[tuple[np.ndarray, ...]] = [(evt, pt, eta, phi, pdg, np.zeros(m, np.int8))]
    tau_evt, tau_pt, tau_eta, tau_phi = (_cat(truth.taujets, i) for i in range(4))
    sources.append((tau_evt.astype(np.int64), tau_pt, tau_eta, tau_phi, np.zeros(len(tau_evt), np.int32),
                    np.full(len(tau_evt), 2, np.int8)))
    for src, name, prob in ((3, "_Electron_lepjets", 0.9), (4, "_Muon_lepjets", 0.5)):
        l_evt, l_pt, l_eta, l_phi = lep[name]
        sel = rng.random(len(l_evt)) < prob
        c = int(sel.sum())
        sources.append((l_evt[sel], l_pt[sel] * rng.uniform(1.0, 1.2, c), l_eta[sel], l_phi[sel],
                        np.zeros(c, np.int32), np.full(c, src, np.int8)))
    sources.append((pu_evt, 10.0 + rng.exponential(4.5, k), rng.uniform(-4.7, 4.7, k),
                    rng.uniform(-np.pi, np.pi, k), np.zeros(k, np.int32), np.full(k, 5, np.int8)))
    j_evt = np.concatenate([s[0] for s in sources]).astype(np.int64)
    j_pt = np.maximum(np.concatenate([s[1] for s in sources]), 0.1)
    j_eta = np.concatenate([s[2] for s in sources])
    j_phi = np.concatenate([s[3] for s in sources])
    j_pdg = np.concatenate([s[4] for s in sources]).astype(np.int32)
    j_src = np.concatenate([s[5] for s in sources])
    nj = len(j_evt)
    j_apdg = np.abs(j_pdg)
    j_hflav = np.select([j_apdg == 5, j_apdg == 4], [5, 4], 0).astype(np.int32)
    # energy response and resolution (stochastic, noise and constant terms; worse forward)
    resp = np.select([j_hflav == 5, j_hflav == 4, j_src == 5], [tune.b_response, 0.97, 1.0], tune.light_response)
    sigma = np.sqrt((2.5 / j_pt) ** 2 + 0.9**2 / j_pt + 0.04**2) * (1.0 + 0.08 * np.abs(j_eta)) * tune.jet_res
    r = np.maximum(resp + sigma * rng.standard_normal(nj), 0.2)
    j_pt_reco = j_pt * r
    ang = 0.01 + 0.6 / j_pt
    j_eta_reco = j_eta + ang * rng.standard_normal(nj)
    j_phi_reco = _delta_phi(j_phi + ang * rng.standard_normal(nj))
    keep = (j_pt_reco > 15.0) & (np.abs(j_eta_reco) < 4.7)
    # jet ID: 6 = tight + tight-lepton-veto, 2 = tight only, 0 = fails; lepton-dominated jets fail the veto
    forward = np.abs(j_eta_reco) > 2.7
    id_p = np.select(
        [((j_src == 3) | (j_src == 4))[:, None], (j_src == 5)[:, None], forward[:, None]],
        [np.array([[0.15, 0.85, 0.0]]), np.array([[0.2, 0.12, 0.68]]), np.array([[0.06, 0.1, 0.84]])],
        np.array([[0.02, 0.04, 0.94]]),
    )
    jet_id = np.array([0, 2, 6], np.int32)[_choice(rng, id_p, nj)]
    # CSVv2: -10 without enough tracks (always outside the tracker), Beta shapes by hadron flavour
    btag = np.select(
        [j_hflav == 5, j_hflav == 4, (j_src == 3) | (j_src == 4)],
        [rng.beta(*tune.btag_b, nj), rng.beta(1.5, 1.8, nj), rng.beta(1.0, 8.0, nj)],
        rng.beta(1.3, 3.6, nj),
    )
    no_tracks = np.abs(j_eta_reco) >= 2.4
    no_tracks |= rng.random(nj) < np.select([j_hflav == 5, j_src == 5], [0.03, 0.45], 0.12)
    btag = np.where(no_tracks, -10.0, _reduce_precision(btag, 11))
    # quark/gluon likelihood: quark jets near 1, gluon jets near 0, -1 outside the tracker or for pile-up
    quark = (j_apdg >= 1) & (j_apdg <= 5)
    qgl = np.select([quark, j_src >= 2], [rng.beta(2.6, 1.3, nj), rng.beta(2.0, 1.5, nj)], rng.beta(1.3, 2.4, nj))
    qgl_missing = (np.abs(j_eta_reco) >= 2.5) | ((j_src == 5) & (rng.random(nj) < 0.6))
    qgl = np.where(qgl_missing, -1.0, _reduce_precision(qgl, 11))
    mass = j_pt_reco * np.exp(rng.normal(np.log(np.where(j_hflav == 5, 0.17, 0.14)), 0.3, nj))
    area = rng.normal(0.5, 0.03, nj)
    parton_flavour = np.where(j_src <= 1, j_pdg, 0)
    cols = {
        "pt": j_pt_reco, "eta": j_eta_reco, "phi": j_phi_reco, "mass": mass, "area": area, "btagCSVV2": btag,
        "qgl": qgl, "jetId": jet_id, "hadronFlavour": j_hflav, "partonFlavour": parton_flavour,
    }
    jet_cols = {
        k: (v[keep].astype(_F32) if v.dtype.kind == "f" else v[keep].astype(np.int32)) for k, v in cols.items()
    }
    jets = _jagged(n, j_evt[keep], j_pt_reco[keep], jet_cols)
    # missing transverse momentum: invisible particles plus a resolution driven by the scalar sum
    sum_et = (np.bincount(j_evt[keep], weights=j_pt_reco[keep], minlength=n) + lep["_sum_pt"]
              + rng.gamma(4.0, 90.0, n))
    met_sigma = 0.5 * np.sqrt(sum_et)
    met_x = inv_px + met_sigma * rng.standard_normal(n)
    met_y = inv_py + met_sigma * rng.standard_normal(n)
    # photons: not used by the analysis (there so that column pruning is visible)
    n_ph = rng.poisson(0.35, n)
    ph_evt = np.repeat(np.arange(n), n_ph)
    q = len(ph_evt)
    ph_pt = 15.0 + rng.exponential(12.0, q)
    photons = _jagged(n, ph_evt, ph_pt, {
        "pt": ph_pt.astype(_F32), "eta": rng.uniform(-2.5, 2.5, q).astype(_F32),
        "phi": rng.uniform(-np.pi, np.pi, q).astype(_F32), "mass": np.zeros(q, _F32),
    })
    rho = np.maximum(0.65 * npvs + rng.normal(0.0, 1.5, n), 0.1)
    return {
        "Electron": lep["Electron"],
        "Jet": jets,
        "MET_phi": np.arctan2(met_y, met_x).astype(_F32),
        "MET_pt": np.hypot(met_x, met_y).astype(_F32),
        "MET_sumEt": sum_et.astype(_F32),
        "Muon": lep["Muon"],
        "Photon": photons,
        "PV_npvs": npvs.astype(np.int32),
        "PV_npvsGood": (npvs - rng.binomial(npvs, 0.05)).astype(np.int32),
        "fixedGridRhoFastjetAll": rho.astype(_F32),
    }


# --- events, files, catalogue -------------------------------------------------------------------------------------


def _rng(seed: int, sample: str, file_index: int, chunk: int) -> np.random.Generator:
    """An independent stream per (seed, sample, file, chunk); crc32 because ``hash(str)`` is salted per process."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(sample.encode()), file_index, chunk]))


def generate_events(
    process: str, variation: str, n: int, rng: np.random.Generator, first_event: int = 1, *,
    filtered: bool = True,
) -> dict[str, Any]:
    """Generate ``n`` events of one sample as NanoAOD branches (collections as awkward records, e.g. ``Jet``).

    ``event`` numbers run from ``first_event``; the dict is ready for ``WritableTree.extend``. ``filtered``
    (default) generates only events that pass the sample's generator-level filter (:data:`_FILTERS`);
    ``filtered=False`` the unfiltered process, to check what the filter removes.
    """
    return _generate_chunk(process, variation, n, rng, first_event, filtered)[0]


def _generate_chunk(process: str, variation: str, n: int, rng: np.random.Generator, first_event: int,
                    filtered: bool) -> tuple[dict[str, Any], int]:
    """:func:`generate_events` plus the number of events tried for the ``n`` that passed the filter."""
    if process not in _PROCESSES:
        raise ValueError(f"no generator for process '{process}' (known: {', '.join(_PROCESSES)})")
    tune = tune_for(process, variation)
    truth, tried = _generate_truth(process, tune, n, rng, filtered)
    reco = _detector(truth, rng, tune)
    gen = [np.stack(c, axis=1) for c in zip(*truth.gen_cols, strict=True)] if truth.gen_cols else []
    k = len(truth.gen_cols)
    counts = np.full(n, k)
    names = ("pt", "eta", "phi", "mass", "pdgId", "genPartIdxMother", "status", "statusFlags")
    genpart = ak.unflatten(
        ak.zip(
            {nm: a.ravel().astype(_F32 if a.dtype.kind == "f" else np.int32) for nm, a in zip(names, gen,
                                                                                                 strict=True)},
            depth_limit=1,
        ),
        counts,
    )
    event = np.arange(first_event, first_event + n, dtype=np.uint64)
    weight = np.where(rng.random(n) < tune.neg_weight_frac, -1.0, 1.0).astype(_F32)
    return {
        "run": np.ones(n, np.uint32),
        "luminosityBlock": (event // 250 + 1).astype(np.uint32),
        "event": event,
        "Electron": reco.pop("Electron"),
        "GenPart": genpart,
        "genWeight": weight,
        "Jet": reco.pop("Jet"),
        **reco,
    }, tried


def _new_events_tree(file: Any, data: dict[str, Any]) -> Any:
    """``mktree`` for ``data``'s branches, with ``uint32`` counters as in NanoAOD.

    uproot always declares generated counters (``nJet``) as int32; before anything is filled, switch their
    leaves to unsigned and rewrite the (still empty) TTree header so ROOT and uproot both see ``UInt_t``.
    """
    types = {k: (v.type.content if isinstance(v, ak.Array) else v.dtype) for k, v in data.items()}
    tree = file.mktree("Events", types)
    cascading = getattr(tree, "_cascading", None)
    branch_data = getattr(cascading, "_branch_data", None)
    if cascading is None or branch_data is None:  # pragma: no cover - depends on uproot internals
        raise RuntimeError("this uproot version cannot write unsigned NanoAOD counters; please report it")
    for datum in branch_data:
        if datum.get("kind") == "counter":
            datum["dtype"] = np.dtype(">u4")
            datum["fTitle"] = datum["fTitle"][:-1] + "i"
    old = cascading._key.seek_location
    cascading.write_anew(tree._file.sink)
    if cascading._key.seek_location != old:  # the file keys its trees by location: relocating later needs it
        tree._file._move_tree(old, cascading._key.seek_location)
    return tree


def _write_file(path: Path, process: str, variation: str, seed: int, file_index: int, n_events: int) -> int:
    """Write one NanoAOD file of ``n_events`` events (in chunks), atomically; return the events tried."""
    name = f"{process}__{variation}"
    tried = 0
    with atomic_path(path) as tmp, uproot.recreate(tmp) as f:
        tree = None
        for chunk, start in enumerate(range(0, n_events, CHUNK_SIZE)):
            size = min(CHUNK_SIZE, n_events - start)
            data, n_tried = _generate_chunk(process, variation, size, _rng(seed, name, file_index, chunk),
                                            file_index * n_events + start + 1, True)
            tried += n_tried
            if tree is None:
                tree = _new_events_tree(f, data)
            tree.extend(data)
    return tried


#: Written beside ``ntuples.json``: how each sample was generated and what its filter kept.
REPORT_NAME = "generator.json"


def generate(
    outdir: Path,
    *,
    events_per_file: int = DEFAULT_EVENTS_PER_FILE,
    files_per_sample: int = DEFAULT_FILES_PER_SAMPLE,
    seed: int = 42,
    samples: list[str] | None = None,
    progress: bool = False,
) -> Catalog:
    """Generate NanoAOD files for the samples of the bundled catalogue and write ``outdir/ntuples.json``.

    ``samples`` restricts to names like ``ttbar__PS_var`` or whole processes (``wjets``). Files are
    ``outdir/<process>__<variation>__<k>.root``; the returned catalogue (also saved) has absolute paths, the
    true event counts and the AGC cross sections.
    """
    if isinstance(events_per_file, bool) or not isinstance(events_per_file, int) or events_per_file < 1:
        raise ValueError(f"events per file must be a positive integer, got {events_per_file!r}")
    if isinstance(files_per_sample, bool) or not isinstance(files_per_sample, int) or files_per_sample < 1:
        raise ValueError(f"files per sample must be a positive integer, got {files_per_sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    template = load_catalog().select(samples)
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = [(s, k) for s in template for k in range(files_per_sample)]

    report: dict[str, dict[str, Any]] = {}

    def run(advance: Any = None) -> list[Sample]:
        out = []
        for s in template:
            files = []
            tried = 0
            for k in range(files_per_sample):
                path = outdir / f"{s.name}__{k:03d}.root"
                tried += _write_file(path, s.process, s.variation, seed, k, events_per_file)
                files.append(InputFile(str(path), events_per_file))
                if advance is not None:
                    advance()
            kept = events_per_file * files_per_sample
            analytic = analytic_filter_efficiency(s.process, s.variation)
            efficiency = analytic * kept / tried
            # a filtered sample is normalised like real filtered MC: effective cross section sigma x efficiency
            out.append(Sample(s.process, s.variation, tuple(files), s.xsec * efficiency, kept))
            report[s.name] = {
                "filter": describe_filter(s.process, s.variation), "cross_section_pb": s.xsec,
                "filter_efficiency": efficiency, "analytic_efficiency": analytic,
                "kinematic_efficiency": kept / tried, "events_tried": tried, "events_kept": kept,
                "effective_xsec_pb": s.xsec * efficiency,
            }
        return out

    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"generating {len(jobs)} files", total=len(jobs))
            new_samples = run(lambda: bar.advance(task))
    else:
        new_samples = run()
    catalog_path = outdir / "ntuples.json"
    catalog = Catalog(tuple(new_samples), str(catalog_path))
    save_catalog(catalog, catalog_path)
    atomic_write_text(outdir / REPORT_NAME, json.dumps({"seed": seed, "events_per_file": events_per_file,
                                                         "samples": report}, indent=2) + "\n")
    return catalog
