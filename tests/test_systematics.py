"""Systematic variations: deterministic per event, independent of chunking, the AGC's factors and precision."""

from __future__ import annotations

import numpy as np

from agc_sx.constants import BTAG_VAR_SLOPE, JER_SIGMA, JES_UP_FACTOR, N_BTAG_VARIATIONS
from agc_sx.systematics import (
    btag_weight_factors,
    jet_pt_variations,
    scale_var_factors,
    standard_normal,
)


def _events(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 8, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return (np.ones(n, np.uint32), rng.integers(1, 500, n).astype(np.uint32),
            rng.permutation(10 * n)[:n].astype(np.uint64), offsets)


def test_resolution_factors_depend_on_the_event_only_not_on_the_chunk() -> None:
    run, lumi, event, offsets = _events(2000)
    whole = standard_normal(run, lumi, event, offsets)
    cut = 777
    first = standard_normal(run[:cut], lumi[:cut], event[:cut], offsets[: cut + 1])
    rest = standard_normal(run[cut:], lumi[cut:], event[cut:], offsets[cut:] - offsets[cut])
    np.testing.assert_array_equal(whole, np.concatenate([first, rest]))
    np.testing.assert_array_equal(whole, standard_normal(run, lumi, event, offsets))


def test_resolution_factors_are_standard_normal() -> None:
    run, lumi, event, offsets = _events(40000)
    z = standard_normal(run, lumi, event, offsets)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.01


def test_pt_variations_and_their_precision() -> None:
    run, lumi, event, offsets = _events(100)
    pt = np.linspace(25, 200, int(offsets[-1])).astype(np.float32)
    v = jet_pt_variations(pt, run, lumi, event, offsets)
    assert v["nominal"] is pt
    assert v["pt_scale_up"].dtype == np.float64
    np.testing.assert_array_equal(v["pt_scale_up"], pt * np.float64(JES_UP_FACTOR))
    np.testing.assert_allclose(v["pt_res_up"] / pt, 1 + JER_SIGMA * standard_normal(run, lumi, event, offsets))


def test_btag_and_wjets_weight_factors() -> None:
    lead = np.array([[50, 100, 25, 75]], dtype=np.float32)
    f = btag_weight_factors(lead)
    assert sorted(f) == sorted(f"btag_var_{i}_{d}" for i in range(N_BTAG_VARIATIONS) for d in ("up", "down"))
    for i in range(N_BTAG_VARIATIONS):
        expected = BTAG_VAR_SLOPE * lead[0, i] / 50
        np.testing.assert_allclose(f[f"btag_var_{i}_up"], 1 + expected)
        np.testing.assert_allclose(f[f"btag_var_{i}_down"], 1 - expected)
    up, down = scale_var_factors()["scale_var_up"], scale_var_factors()["scale_var_down"]
    assert up > 1 > down > 0
