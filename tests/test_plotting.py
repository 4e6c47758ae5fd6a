"""``agc-sx plot`` on synthetic histogram files: valid PNGs; drawn bars equal the inputs."""

from __future__ import annotations

import struct
from pathlib import Path

import hist
import numpy as np
import pytest
import uproot
from click.testing import CliRunner
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import StepPatch
from test_fit import write_toy_histograms

from agc_sx.cli import main
from agc_sx.constants import PROCESSES, REGIONS
from agc_sx.plotting import ML_LABELS, PROCESS_LABELS, PlotError, ml_input, plot_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (low, high, peak, width) of each ML observable (issue 5 ranges); W+jets is drawn flatter than ttbar.
_ML_RANGES = {
    "deltar": (0.0, 6.0, 2.0, 0.8),
    "mass_leptonbtoplep": (50.0, 300.0, 110.0, 35.0),
    "mass_w1w2": (50.0, 300.0, 82.0, 15.0),
    "mass_w1w2btophad": (50.0, 550.0, 172.0, 25.0),
    "pt_w1w2btophad": (50.0, 550.0, 180.0, 70.0),
    "pt": (25.0, 300.0, 60.0, 35.0),
    "btag": (0.0, 1.0, 0.8, 0.25),
    "qgl": (-1.0, 1.0, 0.4, 0.3),
}
_ML_YIELDS = {"ttbar": 3000.0, "wjets": 150.0, "single_top_s_chan": 20.0, "single_top_t_chan": 120.0,
              "single_top_tW": 250.0}


def write_toy_ml(path: Path) -> dict[str, np.ndarray]:
    """20 features x (every process nominal + pseudodata), 25 bins each, as ``agc-sx process`` writes them."""
    written = {}
    with uproot.recreate(path) as f:
        for feature in ML_LABELS:
            lo, hi, peak, width = _ML_RANGES.get(feature) or _ML_RANGES[feature.split("_")[0]]
            edges = np.linspace(lo, hi, 26)
            x = 0.5 * (edges[1:] + edges[:-1])
            data = np.zeros(25)
            for i, process in enumerate(PROCESSES):
                w = width * (1.0 + 0.6 * (process != "ttbar"))
                shape = np.exp(-0.5 * ((x - peak) / w) ** 2) + 0.05 * (i + 1) / 5
                values = _ML_YIELDS[process] * shape / shape.sum()
                written[f"{feature}_{process}"] = values
                data += values * (1.3 if process == "ttbar" else 1.0)
            written[f"{feature}_pseudodata"] = data
            for key in (f"{feature}_{p}" for p in (*PROCESSES, "pseudodata")):
                h = hist.Hist(hist.axis.Regular(25, lo, hi), storage=hist.storage.Weight())
                h.view().value = written[key]
                h.view().variance = 0.05 * written[key]
                f[key] = h
    return written


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.fixture(scope="module")
def plotted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    folder = tmp_path_factory.mktemp("plots")
    contents = write_toy_histograms(folder / "histograms.root", mu=1.3, drop=["4j2b_ttbar_btag_var_3_down"])
    ml = write_toy_ml(folder / "histograms_ml.root")
    plots = plot_all(folder / "histograms.root", folder / "out")
    return {p.name: p for p in plots}, contents, ml


def test_every_plot_is_a_sane_png(plotted: tuple[dict, dict, dict]) -> None:
    plots, _, _ = plotted
    expected = {f"{r}_stack" for r in REGIONS} | {
        f"{r}_ttbar_variations_{g}" for r in REGIONS for g in ("btag", "jet", "ME_PS", "scale")
    } | {"ml_observables"}
    assert set(plots) == expected
    for plot in plots.values():
        assert plot.path.name == f"{plot.name}.png" and plot.path.is_file()
        width, height = _png_size(plot.path)
        assert 400 <= width <= 4000 and 400 <= height <= 4000, (plot.name, width, height)
        assert plot.path.stat().st_size > 20_000  # a drawn plot, not an empty canvas
    assert _png_size(plots["ml_observables"].path)[0] > _png_size(plots["4j1b_stack"].path)[0]
    assert not list(plots["4j1b_stack"].path.parent.glob("*.part"))


def _stack_heights(fig: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (bar heights, edges) of every filled StepPatch in the main panel."""
    ax = fig.axes[0]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for patch in ax.patches:
        if isinstance(patch, StepPatch) and patch.get_label() in PROCESS_LABELS.values():
            values, edges, baseline = patch.get_data()
            out[str(patch.get_label())] = (np.asarray(values) - np.asarray(baseline), np.asarray(edges))
    return out


@pytest.mark.parametrize("region", REGIONS)
def test_stack_heights_equal_histogram_contents(plotted: tuple[dict, dict, dict], region: str) -> None:
    plots, contents, _ = plotted
    fig = plots[f"{region}_stack"].figure
    heights = _stack_heights(fig)
    assert len(heights) == len(PROCESSES)
    for process in PROCESSES:
        expected = contents[f"{region}_{process}"]
        edges = np.linspace(50, 550, 26)
        if region == "4j1b":  # as the fit sees it: from 110 GeV, pairs of 20 GeV bins merged
            expected = expected[3:].reshape(11, 2).sum(axis=1)
            edges = edges[3::2]
        got, got_edges = heights[PROCESS_LABELS[process]]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        np.testing.assert_allclose(got_edges, edges)
    # the stack is cumulative: the top of the highest patch is the total MC
    top = max(np.max(np.asarray(p.get_data()[0])) for p in fig.axes[0].patches if isinstance(p, StepPatch)
              and p.get_label() in PROCESS_LABELS.values())
    total = np.sum([h for h, _ in heights.values()], axis=0)
    assert top == pytest.approx(total.max(), rel=1e-6)


def test_pseudodata_points_and_ratio(plotted: tuple[dict, dict, dict]) -> None:
    plots, contents, _ = plotted
    fig = plots["4j2b_stack"].figure
    main_ax, ratio_ax = fig.axes[0], fig.axes[1]
    data = contents["4j2b_pseudodata"]
    mc = sum(contents[f"4j2b_{p}"] for p in PROCESSES)
    ys = [np.asarray(line.get_ydata()) for line in main_ax.lines if len(line.get_ydata()) == len(data)]
    assert any(np.allclose(y, data) for y in ys)
    ratio = [np.asarray(line.get_ydata()) for line in ratio_ax.lines if len(line.get_ydata()) == len(data)]
    assert any(np.allclose(y, data / mc) for y in ratio)
    # the error bars of the points are Poisson-like
    bars = [c for c in main_ax.collections if isinstance(c, LineCollection)]
    lengths = [np.array([s[1, 1] - s[0, 1] for s in c.get_segments()]) for c in bars]
    assert any(np.allclose(length, 2 * np.sqrt(data)) for length in lengths)


def test_variation_plots_skip_absent_templates(plotted: tuple[dict, dict, dict]) -> None:
    plots, _, _ = plotted
    def legend(name: str) -> list[str]:
        return [t.get_text() for t in plots[name].figure.axes[0].get_legend().texts]

    labels_4j2b, labels_4j1b = legend("4j2b_ttbar_variations_btag"), legend("4j1b_ttbar_variations_btag")
    assert "btag_var_3_down" in labels_4j1b and "btag_var_3_down" not in labels_4j2b
    assert len(labels_4j1b) == 9  # nominal + 8


def test_ml_grid_has_the_20_observables(plotted: tuple[dict, dict, dict]) -> None:
    plots, _, ml = plotted
    grid = plots["ml_observables"].figure
    visible = [ax for ax in grid.axes if ax.get_visible()]
    assert len(visible) == len(ML_LABELS) == 20
    for ax, feature in zip(visible, ML_LABELS, strict=True):  # each panel stacks its own feature's contents
        ttbar = PROCESS_LABELS["ttbar"]
        patch = next(p for p in ax.patches if isinstance(p, StepPatch) and p.get_label() == ttbar)
        values, _, baseline = patch.get_data()
        heights = np.asarray(values) - np.asarray(baseline)
        np.testing.assert_allclose(heights, ml[f"{feature}_ttbar"], rtol=1e-6)


def test_ml_file_is_found_beside_or_given(tmp_path: Path) -> None:
    hpath = tmp_path / "histograms.root"
    assert ml_input(hpath) is None
    (tmp_path / "other.root").write_bytes(b"")
    assert ml_input(hpath, tmp_path / "other.root") == tmp_path / "other.root"
    with pytest.raises(PlotError, match="no such file"):
        ml_input(hpath, tmp_path / "absent.root")
    (tmp_path / "histograms_ml.root").write_bytes(b"")
    assert ml_input(hpath) == tmp_path / "histograms_ml.root"


def test_missing_pseudodata_is_a_clear_error(tmp_path: Path) -> None:
    hpath = tmp_path / "histograms.root"
    write_toy_histograms(hpath, drop=["4j1b_pseudodata"])
    with pytest.raises(PlotError, match="'4j1b_pseudodata' is missing"):
        plot_all(hpath, tmp_path / "out")
    res = CliRunner().invoke(main, ["plot", str(hpath), "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 1 and "4j1b_pseudodata" in res.output and "Traceback" not in res.output


def test_cli_writes_the_plots_without_ml_grid_when_no_ml_file(tmp_path: Path) -> None:
    hpath = tmp_path / "histograms.root"
    write_toy_histograms(hpath)
    res = CliRunner().invoke(main, ["plot", str(hpath), "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    written = sorted((tmp_path / "p").glob("*.png"))
    assert len(written) == 10 and all(str(p) in res.output for p in written)
    assert not (tmp_path / "p" / "ml_observables.png").exists()


def test_background_absent_from_a_region_stacks_as_zero(tmp_path: Path) -> None:
    hpath = tmp_path / "histograms.root"
    write_toy_histograms(hpath, drop=["4j2b_wjets"])
    plots = {p.name: p for p in plot_all(hpath, tmp_path / "out")}
    heights = _stack_heights(plots["4j2b_stack"].figure)
    got, _ = heights[PROCESS_LABELS["wjets"]]
    assert np.all(got == 0)
    assert np.any(_stack_heights(plots["4j1b_stack"].figure)[PROCESS_LABELS["wjets"]][0] > 0)
