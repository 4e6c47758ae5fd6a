"""Plots of ``histograms.root``: stacked MC against pseudodata, ttbar variations, and the ML observables.

Figures are built as :class:`matplotlib.figure.Figure` objects without pyplot, so they render with the Agg
canvas whatever backend the caller has, hold no global state, and can be inspected (tests read the bar heights
back from the artists). The 4j1b region is shown with the fit's binning, so the plot is what the fit sees.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import mplhep
import numpy as np
import uproot
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .constants import (
    BTAG_VARIATIONS,
    JET_VARIATIONS,
    LUMI_PB,
    ML_FEATURES,
    OBSERVABLES,
    PROCESSES,
    REGIONS,
)
from .errors import PlotError
from .histograms import DATA_SAMPLE as DATA
from .histograms import (
    ML_OUTPUT_NAME,
    OBSERVABLE_LABELS,
    Histogram1D,
    HistogramError,
    hist_key,
    read_histogram,
    read_nominals,
    rebin_for_fit,
)
from .utils import atomic_path

log = logging.getLogger(__name__)


_LABELS: dict[str, str] = {
    "deltar_leptonbtoplep": r"$\Delta R(\ell, b_{lep})$",
    "deltar_w1w2": r"$\Delta R(W_1, W_2)$",
    "deltar_w1btophad": r"$\Delta R(W_1, b_{had})$",
    "deltar_w2btophad": r"$\Delta R(W_2, b_{had})$",
    "mass_leptonbtoplep": r"$m(\ell + b_{lep})$ [GeV]",
    "mass_w1w2": r"$m(W_1 + W_2)$ [GeV]",
    "mass_w1w2btophad": r"$m(W_1 + W_2 + b_{had})$ [GeV]",
    "pt_w1w2btophad": r"$p_T(W_1 + W_2 + b_{had})$ [GeV]",
    "pt_w1": r"$p_T(W_1)$ [GeV]",
    "pt_w2": r"$p_T(W_2)$ [GeV]",
    "pt_btophad": r"$p_T(b_{had})$ [GeV]",
    "pt_btoplep": r"$p_T(b_{lep})$ [GeV]",
    "btag_w1": r"b-tag$(W_1)$",
    "btag_w2": r"b-tag$(W_2)$",
    "btag_btophad": r"b-tag$(b_{had})$",
    "btag_btoplep": r"b-tag$(b_{lep})$",
    "qgl_w1": r"QGL$(W_1)$",
    "qgl_w2": r"QGL$(W_2)$",
    "qgl_btophad": r"QGL$(b_{had})$",
    "qgl_btoplep": r"QGL$(b_{lep})$",
}

#: Axis labels of the 20 BDT observables, in the order of the AGC feature vector.
ML_LABELS: dict[str, str] = {name: _LABELS[name] for name, *_ in ML_FEATURES}

PROCESS_LABELS = {
    "ttbar": r"$t\bar{t}$",
    "wjets": "W+jets",
    "single_top_s_chan": "single top, s-channel",
    "single_top_t_chan": "single top, t-channel",
    "single_top_tW": "tW",
}
PROCESS_COLORS = {
    "ttbar": "#e42536",
    "wjets": "#5790fc",
    "single_top_s_chan": "#f89c20",
    "single_top_t_chan": "#964a8b",
    "single_top_tW": "#9c9ca1",
}

#: ttbar variations drawn against nominal, one figure per group and region.
VARIATION_GROUPS: dict[str, tuple[str, ...]] = {
    "btag": BTAG_VARIATIONS,
    "jet": tuple(v for v in JET_VARIATIONS if v != "nominal"),
    "ME_PS": ("ME_var", "PS_var"),
    "scale": ("scaleup", "scaledown"),
}
VARIATION_TITLES = {
    "btag": "b-tagging weight variations",
    "jet": "jet energy scale / resolution",
    "ME_PS": "matrix element / parton shower",
    "scale": "renormalisation / factorisation scale",
}

#: Regions drawn with the fit's binning (the AGC shows 4j1b as fitted; 4j2b in the original 20 GeV bins).
FIT_BINNED_REGIONS = ("4j1b",)


@dataclass(frozen=True)
class Plot:
    """One written figure; ``figure`` stays available for inspection (it holds no pyplot state)."""

    name: str
    path: Path
    figure: Figure


# --- reading ------------------------------------------------------------------------------------------------


def region_histogram(h: Histogram1D, region: str) -> Histogram1D:
    """The binning a region is shown in: the fit's for :data:`FIT_BINNED_REGIONS`, the file's otherwise."""
    if region not in FIT_BINNED_REGIONS:
        return h
    try:
        return rebin_for_fit(h)
    except HistogramError as err:
        raise PlotError(f"{region}: {err}") from None


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    if not path.is_file():
        raise PlotError(f"{path}: no such file")
    try:
        f = uproot.open(path)
    except Exception as err:
        raise PlotError(f"{path}: not a readable ROOT file ({' '.join(str(err).split())})") from err
    with f:
        yield f


# --- drawing ------------------------------------------------------------------------------------------------


def _style() -> Any:
    return matplotlib.style.context(mplhep.style.CMS)


def _label(ax: Any) -> None:
    """The experiment label above the axes: CMS Simulation Open Data (the pseudodata is simulated too).

    Drawn as three texts, the suffix anchored to the end of "CMS" (mplhep's own label leaves no gap between
    the two with the fonts available here).
    """
    size = matplotlib.rcParams["font.size"]
    exp = ax.text(0.0, 1.01, "CMS", transform=ax.transAxes, ha="left", va="bottom", fontweight="bold",
                  fontsize=1.3 * size)
    ax.annotate("Simulation Open Data", xy=(1.0, 0.0), xycoords=exp, xytext=(0.35 * size, 0.0),
                textcoords="offset points", ha="left", va="bottom", fontstyle="italic", fontsize=size)
    ax.text(1.0, 1.01, rf"{LUMI_PB / 1000.0:.3f} fb$^{{-1}}$ (13 TeV)", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=0.85 * size)


def _ratio_axes(fig: Figure) -> tuple[Any, Any]:
    main_ax, ratio_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1), "hspace": 0.06})
    fig.subplots_adjust(left=0.13, right=0.97, top=0.93, bottom=0.1)
    return main_ax, ratio_ax


def _draw_stack(ax: Any, mc: Mapping[str, Histogram1D], data: Histogram1D | None,
                title: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``mc`` (first process on top) with data points; return the total MC and its stat. variance."""
    order = list(mc)[::-1]  # smallest at the bottom, the signal on top
    edges = next(iter(mc.values())).edges
    mplhep.histplot(
        [mc[p].values for p in order], edges, stack=True, histtype="fill", ax=ax,
        label=[PROCESS_LABELS.get(p, p) for p in order], color=[PROCESS_COLORS.get(p) for p in order],
        edgecolor="black", linewidth=0.5,
    )
    total = np.sum([h.values for h in mc.values()], axis=0)
    variance = np.sum([h.variances for h in mc.values()], axis=0)
    err = np.sqrt(variance)
    ax.stairs(total + err, edges, baseline=total - err, fill=True, facecolor="none", edgecolor="0.3",
              hatch="////", linewidth=0, label="MC stat. unc.")
    if data is not None:
        mplhep.histplot(data.values, edges, yerr=np.sqrt(np.clip(data.values, 0, None)), histtype="errorbar",
                        color="black", label="Pseudodata", ax=ax)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize="x-small", title_fontsize="small", loc="upper right",
              ncol=2, title=title, alignment="left")
    ax.set_xlim(edges[0], edges[-1])
    top = max(total.max(), data.values.max() if data is not None else 0.0)
    ax.set_ylim(0, 1.5 * top if top > 0 else 1)
    return total, variance


def stack_figure(region: str, mc: Mapping[str, Histogram1D], data: Histogram1D, xlabel: str) -> Figure:
    """Stacked MC with pseudodata points and a data/MC ratio panel."""
    with _style():
        fig = Figure(figsize=(12, 10))
        ax, rax = _ratio_axes(fig)
        total, variance = _draw_stack(ax, mc, data, title=region)
        edges = data.edges
        safe = np.where(total > 0, total, np.nan)
        rel = np.sqrt(variance) / safe
        rax.stairs(1 + rel, edges, baseline=1 - rel, fill=True, facecolor="none", edgecolor="0.3",
                   hatch="////", linewidth=0)
        mplhep.histplot(data.values / safe, edges, yerr=np.sqrt(np.clip(data.values, 0, None)) / safe,
                        histtype="errorbar", color="black", ax=rax)
        rax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
        rax.set_ylim(0.5, 1.5)
        rax.set_ylabel("Data / MC")
        rax.set_xlabel(xlabel)
        ax.set_xlabel("")
        ax.set_ylabel(f"Events / {edges[1] - edges[0]:g} GeV")
        _label(ax)
    return fig


def variation_figure(region: str, nominal: Histogram1D, variations: Mapping[str, Histogram1D], xlabel: str,
                     title: str) -> Figure:
    """Ttbar variations against nominal, with the variation/nominal ratio below."""
    with _style():
        fig = Figure(figsize=(12, 10))
        ax, rax = _ratio_axes(fig)
        edges = nominal.edges
        mplhep.histplot(nominal.values, edges, histtype="step", color="black", linewidth=2, label="nominal",
                        ax=ax)
        safe = np.where(nominal.values > 0, nominal.values, np.nan)
        colors = [matplotlib.colormaps["tab10"](i) for i in range(10)]
        pairs: dict[str, int] = {}  # up and down of one source share a colour
        for name, h in variations.items():
            index = pairs.setdefault(name.removesuffix("up").removesuffix("down"), len(pairs))
            style = {"color": colors[index % 10], "linestyle": "--" if name.endswith("down") else "-"}
            mplhep.histplot(h.values, edges, histtype="step", label=name, ax=ax, **style)
            rax.stairs(h.values / safe, edges, baseline=None, **style)
        rax.axhline(1.0, color="black", linewidth=1)
        lo, hi = np.nanmin([np.nanmin(h.values / safe) for h in variations.values()] + [0.95]), np.nanmax(
            [np.nanmax(h.values / safe) for h in variations.values()] + [1.05])
        pad = 0.1 * (hi - lo)
        rax.set_ylim(lo - pad, hi + pad)
        rax.set_ylabel("Var. / nom.")
        rax.set_xlabel(xlabel)
        ax.set_ylabel(f"Events / {edges[1] - edges[0]:g} GeV")
        ax.set_ylim(0, 1.45 * max(nominal.values.max(), 1e-9))
        ax.legend(fontsize="x-small", title_fontsize="small", loc="upper right", ncol=2, alignment="left",
                  title=f"{region}, $t\\bar{{t}}$: {title}")
        ax.set_xlim(edges[0], edges[-1])
        _label(ax)
    return fig


def ml_grid_figure(features: Mapping[str, tuple[Mapping[str, Histogram1D], Histogram1D]]) -> Figure:
    """A grid of the ML observables (the chosen jet assignment in 4j2b): stacked MC with pseudodata points."""
    n = len(features)
    ncols = 5
    nrows = -(-n // ncols)
    with _style():
        fig = Figure(figsize=(5 * ncols, 4.2 * nrows))
        fig.subplots_adjust(left=0.04, right=0.99, top=0.91, bottom=0.06, wspace=0.28, hspace=0.38)
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
        for ax, (feature, (mc, data)) in zip(axes, features.items(), strict=False):
            _draw_stack(ax, mc, data)
            ax.minorticks_off()  # small panels: major ticks suffice (minor ones dominate the drawing time)
            ax.set_xlabel(ML_LABELS.get(feature, feature), fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.yaxis.get_offset_text().set_fontsize("x-small")
            ax.xaxis.set_major_locator(MaxNLocator(5))
            legend = ax.get_legend()
            if legend is not None:
                legend.remove()
        for ax in axes[n:]:
            ax.set_visible(False)
        fig.suptitle(
            r"$\bf{CMS}$ $\it{Simulation\ Open\ Data}$      4j2b, BDT jet assignment      "
            f"{LUMI_PB / 1000:.3f} fb$^{{-1}}$ (13 TeV)",
            fontsize="medium", y=0.99,
        )
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles[::-1], labels[::-1], loc="upper center", ncol=len(labels), fontsize="small",
                   bbox_to_anchor=(0.5, 0.965), frameon=False)
    return fig


# --- the command --------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def ml_input(histograms: Path, ml: Path | None = None) -> Path | None:
    """The ML histogram file to draw: ``ml`` if given (must exist), else ``histograms_ml.root`` if present."""
    if ml is not None:
        if not Path(ml).is_file():
            raise PlotError(f"{ml}: no such file")
        return Path(ml)
    candidate = Path(histograms).with_name(ML_OUTPUT_NAME)
    return candidate if candidate.is_file() else None


def plot_all(histograms: Path, output_dir: Path, *, ml: Path | None = None) -> list[Plot]:
    """Write every plot of ``histograms`` (and of the ML file, if any) into ``output_dir``; return them.

    ``ml`` defaults to ``histograms_ml.root`` next to ``histograms``; the ML grid is drawn only if that file
    exists (an explicitly given ``ml`` must exist).
    """
    histograms = Path(histograms)
    output_dir = Path(output_dir)
    ml_path = ml_input(histograms, ml)
    figures: list[tuple[str, Figure]] = []

    with _open(histograms) as f:
        present = set(f.keys(cycle=False))
        region_nominals = read_nominals(f, list(REGIONS), histograms)
        for region in REGIONS:
            xlabel = OBSERVABLE_LABELS.get(OBSERVABLES[region], OBSERVABLES[region])
            nominals = region_nominals[region]
            mc = {p: region_histogram(nominals[p], region) for p in PROCESSES}
            data = region_histogram(nominals[DATA], region)
            figures.append((f"{region}_stack", stack_figure(region, mc, data, xlabel)))
            for group, names in VARIATION_GROUPS.items():
                variations = {
                    v: region_histogram(read_histogram(f, key, histograms), region)
                    for v in names
                    if (key := hist_key(region, "ttbar", v)) in present
                }
                if not variations:
                    log.warning("%s: no ttbar %s variations, plot skipped", region, group)
                    continue
                fig = variation_figure(region, mc["ttbar"], variations, xlabel, VARIATION_TITLES[group])
                figures.append((f"{region}_ttbar_variations_{group}", fig))

    if ml_path is not None:
        with _open(ml_path) as f:
            ml_nominals = read_nominals(f, list(ML_LABELS), ml_path)
            features = {
                feature: ({p: ml_nominals[feature][p] for p in PROCESSES}, ml_nominals[feature][DATA])
                for feature in ML_LABELS
            }
        figures.append(("ml_observables", ml_grid_figure(features)))

    plots = []
    for name, fig in figures:
        path = output_dir / f"{name}.png"
        _save(fig, path)
        plots.append(Plot(name, path, fig))
    return plots

