"""Exact histogram sums, binning, naming, pseudodata and the ROOT writer."""

from __future__ import annotations

from pathlib import Path

import hist
import numpy as np
import pytest
import uproot

from agc_sx.histograms import ExactHist, bin_index, build_output, hist_key, write_root


def test_bin_index_is_boost_histograms_rule() -> None:
    rng = np.random.default_rng(0)
    edges = np.linspace(50, 550, 26)
    x = np.concatenate([rng.uniform(0, 600, 50000), edges, np.nextafter(edges, 0), np.nextafter(edges, 1e9),
                        [np.nan, np.inf, -np.inf], edges.astype(np.float32).astype(np.float64) + 1e-13])
    h = hist.Hist.new.Reg(25, 50, 550).Int64()
    h.fill(x)
    assert np.array_equal(np.bincount(bin_index(x, 25, 50.0, 550.0), minlength=27), h.values(flow=True))


def test_exact_sums_match_hist_and_do_not_depend_on_order_or_splitting() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 600, 30000)
    w = rng.normal(0.3, 1.0, 30000) * 10.0 ** rng.integers(-8, 8, 30000)  # mixed signs and magnitudes
    whole = ExactHist()
    whole.fill(x, w)
    ref = hist.Hist.new.Reg(25, 50, 550).Weight()
    ref.fill(x, weight=w)
    got = whole.to_hist()
    # correctly rounded exact sums vs float accumulation: agree to rounding, bin by bin
    np.testing.assert_allclose(got.values(flow=True), ref.values(flow=True), rtol=1e-9)
    np.testing.assert_allclose(got.variances(flow=True), ref.variances(flow=True), rtol=1e-12)
    # any split and any merge order give the same bits
    perm = rng.permutation(len(x))
    parts = np.array_split(perm, 7)
    pieces = []
    for p in parts:
        e = ExactHist()
        e.fill(x[p], w[p])
        pieces.append(e)
    merged = ExactHist()
    for e in reversed(pieces):
        merged += e
    assert merged.sumw == whole.sumw and merged.sumw2 == whole.sumw2
    assert np.array_equal(merged.to_hist().view(flow=True), got.view(flow=True))
    # and the exact result is the correctly rounded sum (math.fsum) in one bin
    import math

    in_bin = bin_index(x, 25, 50.0, 550.0) == 5
    assert got.values(flow=True)[5] == math.fsum(w[in_bin])


def test_constant_weight_and_empty_fill() -> None:
    h = ExactHist()
    h.fill(np.array([]), 1.0)
    h.fill(np.array([60.0, 61.0, 600.0]), 0.1)
    values = h.to_hist().values(flow=True)
    assert values[1] == 0.1 + 0.1 and values[-1] == 0.1 and h.entries == 3


def _h(values: list[float]) -> hist.Hist:
    h = hist.Hist.new.Reg(25, 50, 550).Weight()
    h.fill([60.0] * len(values), weight=values)
    return h


def test_naming_pseudodata_and_empty_histograms() -> None:
    assert hist_key("4j1b", "ttbar", "nominal") == "4j1b_ttbar"
    assert hist_key("4j2b", "wjets", "scale_var_down") == "4j2b_wjets_scale_var_down"
    hists = {
        ("4j1b", "ttbar", "ME_var"): _h([2.0]),
        ("4j1b", "ttbar", "PS_var"): _h([4.0]),
        ("4j1b", "wjets", "nominal"): _h([1.0]),
        ("4j1b", "single_top_tW", "btag_var_3_up"): _h([1.0, -1.0]),  # zero sum of weights: not written
    }
    only_flow = hist.Hist.new.Reg(25, 50, 550).Weight()
    only_flow.fill([600.0], weight=[5.0])
    hists[("4j1b", "single_top_s_chan", "nominal")] = only_flow  # no in-range content: not written
    out = build_output(hists, ["4j1b"])
    assert sorted(out) == ["4j1b_pseudodata", "4j1b_ttbar_ME_var", "4j1b_ttbar_PS_var", "4j1b_wjets"]
    pd = out["4j1b_pseudodata"]
    assert pd.values()[0] == (2.0 + 4.0) / 2 + 1.0
    assert pd.variances()[0] == (4.0 + 16.0) / 4 + 1.0


def test_write_root_th1d_with_sumw2(tmp_path: Path) -> None:
    h = _h([0.5, 0.25])
    h.fill([600.0, 10.0], weight=[3.0, 2.0])
    target = tmp_path / "sub" / "histograms.root"
    write_root(target, {"4j1b_ttbar": h, "4j2b_ttbar_pt_res_up": h})
    assert sorted(p.name for p in target.parent.iterdir()) == ["histograms.root"]  # no leftover .part
    with uproot.open(target) as f:
        th = f["4j1b_ttbar"]
        assert th.classname == "TH1D"
        assert np.array_equal(th.values(flow=True), h.values(flow=True))
        assert np.array_equal(th.variances(flow=True), h.variances(flow=True))
        np.testing.assert_allclose(th.axis().edges(), h.axes[0].edges, rtol=1e-15)
        back = th.to_hist()
        assert back.values(flow=True).sum() == 0.75 + 5.0


def test_scalar_weight_fill_equals_elementwise_fill() -> None:
    """The scalar-weight shortcut (count x w, exact) gives the same sums as filling every entry."""
    from agc_sx.histograms import ExactHist

    rng = np.random.default_rng(4)
    values = np.concatenate([rng.uniform(0, 600, 5000), [np.nan, 50.0, 550.0]])
    for w in (0.1234567, 26158.4, 2.0**-1070, -3.5, 0.0):
        scalar, array = ExactHist(), ExactHist()
        scalar.fill(values, w)
        array.fill(values, np.full(len(values), w))
        assert scalar.sumw == array.sumw and scalar.sumw2 == array.sumw2 and scalar.entries == array.entries
        assert scalar.to_hist().values(flow=True).sum() == pytest.approx(w * len(values), rel=1e-12, abs=1e-300)


def test_keys_of_odd_sample_names_stay_flat() -> None:
    """A catalogue process with a ``/`` must not become nested directories in histograms.root."""
    from agc_sx.histograms import hist_key

    assert hist_key("4j1b", "my/ttbar", "nominal") == "4j1b_my_ttbar"
    assert hist_key("4j2b", "ttbar", "../up") == "4j2b_ttbar__up"  # "../up" -> "_up"
    assert hist_key("4j1b", "single_top_tW", "pt_scale_up") == "4j1b_single_top_tW_pt_scale_up"
