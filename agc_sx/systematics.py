"""Systematic variations of the AGC v2 analysis: jet pT variations and event-weight variations.

``pt_res_up`` is where we deliberately differ from the AGC. The AGC draws its Gaussian jet-resolution factors
from numpy's unseeded global RNG, so the histograms change from run to run and with the chunking. Here each
factor is a pure function of the event identity (run, luminosityBlock, event) and the jet's index within the
event: a splitmix64 counter hash gives two uniform numbers, Box-Muller turns them into a standard normal. The
same event thus gets the same factors whatever the chunking, executor or worker count. Jet indices refer to
the pT-ordered NanoAOD jet collection; a skim that drops only jets below a pT threshold (the tail of the
collection) keeps the indices of the jets that matter.
"""

from __future__ import annotations

import numba
import numpy as np

from .constants import (
    BTAG_VAR_PT_REF,
    BTAG_VAR_SLOPE,
    JER_SIGMA,
    JES_UP_FACTOR,
    N_BTAG_VARIATIONS,
    WJETS_SCALE_DOWN,
    WJETS_SCALE_UP,
)

#: Mixed into the hash so that our stream is not the bare splitmix64 of the event numbers.
JER_SEED = np.uint64(0x41474353_58504552)  # "AGCSXPER"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over uint64 (the numpy twin of the compiled ``_mix``)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _mix(x: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _event_key(seed: np.uint64, run: np.uint64, lumi: np.uint64,
               event: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    """The hash key of one event: its factors depend on (run, luminosityBlock, event) only, not on chunking."""
    key = _mix(seed ^ run)
    key = _mix(key ^ lumi)
    return _mix(key ^ event)


@numba.njit(cache=True, nogil=True)
def _pair_normals(key: np.uint64, k: np.int64) -> tuple[float, float]:  # pragma: no cover - compiled
    """Box-Muller pair ``k`` of an event: the N(0, 1) numbers of its jets 2k (cos) and 2k+1 (sin).

    The one definition of the resolution randomness, shared by :func:`standard_normal` and the one-pass
    selection kernel (``selection._variations_kernel``), so both give the same varied pTs bit for bit.
    """
    h1 = _mix(key ^ np.uint64(k))
    h2 = _mix(h1)
    u1 = (np.float64(h1 >> np.uint64(11)) + 1.0) * 2.0**-53  # (0, 1]: the log stays finite
    u2 = np.float64(h2 >> np.uint64(11)) * 2.0**-53  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    return r * np.cos(angle), r * np.sin(angle)


@numba.njit(cache=True, nogil=True)
def _normals_kernel(run: np.ndarray, lumi: np.ndarray, event: np.ndarray, offsets: np.ndarray,
                    seed: np.uint64, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for e in range(len(offsets) - 1):
        key = _event_key(seed, np.uint64(run[e]), np.uint64(lumi[e]), np.uint64(event[e]))
        first, stop = offsets[e], offsets[e + 1]
        for j in range(first, stop, 2):
            a, b = _pair_normals(key, np.int64((j - first) >> 1))
            out[j] = a
            if j + 1 < stop:
                out[j + 1] = b


def standard_normal(run: np.ndarray, lumi: np.ndarray, event: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """One deterministic N(0, 1) number per jet, from (run, luminosityBlock, event, jet index)."""
    out = np.empty(int(offsets[-1]), dtype=np.float64)
    _normals_kernel(np.asarray(run, dtype=np.uint64), np.asarray(lumi, dtype=np.uint64),
                    np.asarray(event, dtype=np.uint64), np.asarray(offsets, dtype=np.int64), JER_SEED, out)
    return out


def jer_factors(run: np.ndarray, lumi: np.ndarray, event: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-jet resolution smearing factors, Gaussian with mean 1 and sigma 0.05 (float64)."""
    return 1.0 + JER_SIGMA * standard_normal(run, lumi, event, offsets)


def pt_scale_up(pt: np.ndarray) -> np.ndarray:
    """Jet pT x 1.03: float32 pT times a float64 factor gives float64, as in the AGC."""
    return pt * np.float64(JES_UP_FACTOR)


def pt_res_up(pt: np.ndarray, run: np.ndarray, lumi: np.ndarray, event: np.ndarray,
              offsets: np.ndarray) -> np.ndarray:
    """Jet pT x a deterministic Gaussian factor per jet (float64)."""
    return pt * jer_factors(run, lumi, event, offsets)


def jet_pt_variations(pt: np.ndarray, run: np.ndarray, lumi: np.ndarray, event: np.ndarray,
                      offsets: np.ndarray) -> dict[str, np.ndarray]:
    """The three jet pT columns, keyed by variation name: nominal, pt_scale_up, pt_res_up.

    The columns the BDT gets; ``selection.select_variations`` computes the same pTs per event in registers
    (tested against these columns in ``tests/test_selection.py``).
    """
    return {
        "nominal": pt,
        "pt_scale_up": pt_scale_up(pt),
        "pt_res_up": pt_res_up(pt, run, lumi, event, offsets),
    }


def btag_weight_factors(lead_pt: np.ndarray) -> dict[str, np.ndarray]:
    """``btag_var_{i}_{up,down}`` weight factors 1 +- 0.075 * pT_i / 50 from the i-th selected nominal jet.

    The AGC divides the (float32) jet pT by 50 in the column precision before the float64 product.
    """
    out: dict[str, np.ndarray] = {}
    for i in range(N_BTAG_VARIATIONS):
        scaled = lead_pt[:, i] / lead_pt.dtype.type(BTAG_VAR_PT_REF)
        out[f"btag_var_{i}_up"] = 1.0 + np.float64(BTAG_VAR_SLOPE) * scaled
        out[f"btag_var_{i}_down"] = 1.0 + np.float64(-BTAG_VAR_SLOPE) * scaled
    return out


def scale_var_factors() -> dict[str, float]:
    """W+jets normalisation variations ``scale_var_{up,down}`` (constant weight factors)."""
    return {"scale_var_up": WJETS_SCALE_UP, "scale_var_down": WJETS_SCALE_DOWN}
