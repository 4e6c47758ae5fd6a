"""The AGC statistical model: a cabinetry configuration built from ``histograms.root``, and the fit.

The model follows the AGC v2 ``cabinetry_config.yml``: both regions rebinned to 11 bins of 40 GeV, ttbar
scaled by the free ``ttbar_norm``, and the AGC systematics as HistFactory modifiers. cabinetry reads ROOT
histograms through a path template, so we first write the rebinned histograms (and nothing else) into the
output folder and point the generated configuration at that file; the fit then sees exactly the binning the
plots show.

The uncertainty on ``ttbar_norm`` is a MINOS interval (default) or comes from the profile likelihood: on
systematics-dominated inputs Minuit's Hesse error is not trustworthy (it jumps by an order of magnitude
between pseudodata sets), so it is only recorded for reference.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uproot
import yaml

from .constants import (
    BTAG_VARIATIONS,
    FIT_RANGE,
    FIT_REBIN,
    HIST_BINS,
    HIST_RANGE,
    LUMI_UNCERTAINTY,
    OBSERVABLES,
    PROCESSES,
    REGIONS,
    TTBAR_ALTERNATIVES,
    WJETS_SCALE_VARIATIONS,
)
from .errors import AgcSxError
from .utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Name of the HistFactory measurement and of the parameter of interest (AGC v2).
MEASUREMENT = "CMS_ttbar"
POI = "ttbar_norm"
POI_NOMINAL = 1.0
POI_BOUNDS = (0.0, 10.0)
DATA_SAMPLE = "pseudodata"
#: Ways to quote the ``ttbar_norm`` interval; both are profile-likelihood based (Δ(−2 ln L) = 1).
INTERVALS = ("minos", "profile")
INTERVAL_LABELS = {"minos": "MINOS", "profile": "profile-likelihood interval"}

#: Names of the files ``run_fit`` writes into its output folder.
CONFIG_NAME = "cabinetry_config.yml"
INPUTS_NAME = "histograms_rebinned.root"
TEMPLATES_DIR = "templates"
WORKSPACE_NAME = "workspace.json"
RESULTS_NAME = "fit_results.json"

_OBSERVABLE_LABELS = {"HT": r"$H_T$ [GeV]", "m_bjj": r"$m_{bjj}$ [GeV]"}


class FitError(AgcSxError, ValueError):
    """Bad input for the fit (a missing histogram, an unexpected binning); the message is one line."""


@dataclass(frozen=True)
class Histogram1D:
    """Bin contents, sum of squared weights and edges of a 1D histogram (no flow bins)."""

    values: np.ndarray
    variances: np.ndarray
    edges: np.ndarray


def _zeros(edges: np.ndarray) -> Histogram1D:
    """An empty histogram: what a zero-sum histogram (not written by the processor) stands for."""
    zeros = np.zeros(len(edges) - 1)
    return Histogram1D(values=zeros, variances=zeros.copy(), edges=np.array(edges, dtype=np.float64))


@dataclass(frozen=True)
class FitResult:
    """Best fit and interval of ``ttbar_norm`` plus where everything was written."""

    value: float
    error_up: float  #: positive distance from ``value`` to the upper end of the interval
    error_down: float  #: positive distance from ``value`` to the lower end of the interval
    interval: str  #: one of :data:`INTERVALS`
    hesse_error: float  #: Minuit's parabolic error, for reference only
    output_dir: Path
    results: Path
    config: Path
    workspace: Path
    plots: tuple[Path, ...] = ()
    #: optional templates absent from the input or empty in the fit range (their nominal was used)
    substituted: tuple[str, ...] = field(default=())
    #: ``{region}_{process}`` without events in the fit range, left out of that region
    left_out: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line for humans, e.g. ``ttbar_norm = 1.300 +0.131 -0.112 (MINOS)``."""
        label = INTERVAL_LABELS[self.interval]
        if math.isclose(self.error_up, self.error_down, rel_tol=5e-3):
            return f"{POI} = {self.value:.3f} ± {self.error_up:.3f} ({label})"
        return f"{POI} = {self.value:.3f} +{self.error_up:.3f} -{self.error_down:.3f} ({label})"


# --- histograms ---------------------------------------------------------------------------------------------


def histogram_key(region: str, process: str, variation: str | None = None) -> str:
    """Key of a histogram in ``histograms.root``: ``{region}_{process}[_{variation}]``."""
    return f"{region}_{process}" if variation in (None, "nominal") else f"{region}_{process}_{variation}"


def read_histogram(file: Any, key: str, source: Path | str = "histograms file") -> Histogram1D:
    """Read one histogram from an open uproot file, raising :class:`FitError` naming the key if absent."""
    if key not in file:
        raise FitError(f"{source}: histogram '{key}' is missing")
    h = file[key]
    variances = h.variances(flow=False)
    values = np.asarray(h.values(flow=False), dtype=np.float64)
    return Histogram1D(
        values=values,
        variances=np.asarray(variances if variances is not None else values, dtype=np.float64),
        edges=np.asarray(h.axis().edges(), dtype=np.float64),
    )


def rebin_for_fit(h: Histogram1D) -> Histogram1D:
    """Drop bins below ``FIT_RANGE[0]``, merge ``FIT_REBIN`` neighbours (AGC: ``h[110j::hist.rebin(2)]``)."""
    lo, hi = FIT_RANGE
    start = np.flatnonzero(np.isclose(h.edges, lo))
    if start.size != 1 or not math.isclose(h.edges[-1], hi):
        raise FitError(f"binning {h.edges[0]:g}-{h.edges[-1]:g} GeV has no bin edge at {lo:g} "
                       f"or does not end at {hi:g}")
    first = int(start[0])
    n_kept = len(h.values) - first
    if n_kept % FIT_REBIN:
        raise FitError(f"{n_kept} bins from {lo:g} GeV cannot be merged in groups of {FIT_REBIN}")
    values = h.values[first:].reshape(-1, FIT_REBIN).sum(axis=1)
    variances = h.variances[first:].reshape(-1, FIT_REBIN).sum(axis=1)
    return Histogram1D(values=values, variances=variances, edges=h.edges[first::FIT_REBIN].copy())


# --- the model ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Systematic:
    """One AGC systematic: the samples it affects and its variation histograms (None: symmetrise / norm)."""

    name: str
    samples: tuple[str, ...]
    up: str | None
    down: str | None
    normalization: float | None = None  #: relative size for a normalisation-only systematic


def systematics() -> tuple[Systematic, ...]:
    """The AGC v2 systematics, in the order of its configuration."""
    me, ps = "ME_var", "PS_var"
    scale_up, scale_down = "scaleup", "scaledown"
    assert {me, ps, scale_up, scale_down} <= set(TTBAR_ALTERNATIVES)
    mc = tuple(PROCESSES)
    out = [
        Systematic("ME_var", ("ttbar",), me, None),
        Systematic("PS_var", ("ttbar",), ps, None),
        Systematic("ttbar_scale", ("ttbar",), scale_up, scale_down),
        Systematic("pt_scale", mc, "pt_scale_up", None),
        Systematic("pt_res", mc, "pt_res_up", None),
    ]
    for i in range(len(BTAG_VARIATIONS) // 2):
        up, down = f"btag_var_{i}_up", f"btag_var_{i}_down"
        assert up in BTAG_VARIATIONS and down in BTAG_VARIATIONS
        out.append(Systematic(f"btag_var_{i}", mc, up, down))
    out.append(Systematic("wjets_scale_var", ("wjets",), *WJETS_SCALE_VARIATIONS))
    out.append(Systematic("luminosity", mc, None, None, normalization=LUMI_UNCERTAINTY))
    return tuple(out)


#: Processes whose nominal histogram must exist in every region: the signal (and the pseudodata, as data).
ALWAYS_PRESENT = ("ttbar", DATA_SAMPLE)


def required_keys() -> list[str]:
    """Histograms the fit cannot do without: the pseudodata and the ttbar nominal, per region."""
    return [histogram_key(r, p) for r in REGIONS for p in ALWAYS_PRESENT]


def read_nominals(file: Any, prefixes: Sequence[str], source: Path | str) -> dict[str, dict[str, Histogram1D]]:
    """Nominal histograms ``{prefix}_{process}`` and ``{prefix}_pseudodata`` for each prefix (region, feature).

    The processor does not write histograms with a zero sum, so a background without events under a prefix
    (W+jets in 4j2b of a small sample, or anywhere in a tiny one) reads as zeros there. The pseudodata and
    ttbar must be present everywhere: without them the file is not a result of ``agc-sx process``.
    """
    present = set(file.keys(cycle=False))
    out: dict[str, dict[str, Histogram1D]] = {}
    for prefix in prefixes:
        out[prefix] = {p: read_histogram(file, f"{prefix}_{p}", source) for p in ALWAYS_PRESENT}
    for process in PROCESSES:
        if process in ALWAYS_PRESENT:
            continue
        keys = [f"{prefix}_{process}" for prefix in prefixes]
        if not any(k in present for k in keys):
            log.warning("%s: no %s histogram at all (no events selected): counted as zero", source, process)
        for prefix, key in zip(prefixes, keys, strict=True):
            if key in present:
                out[prefix][process] = read_histogram(file, key, source)
            else:
                out[prefix][process] = _zeros(out[prefix]["ttbar"].edges)
    return out


def optional_keys() -> list[str]:
    """Variation histograms of the model; an absent one (zero sum, not written) means 'no effect'."""
    keys = []
    for r in REGIONS:
        for s in systematics():
            for p in s.samples:
                keys += [histogram_key(r, p, v) for v in (s.up, s.down) if v is not None]
    return list(dict.fromkeys(keys))


def build_config(input_file: Path, histogram_folder: Path,
                 sample_regions: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The cabinetry configuration of the AGC model, reading ``{region}_{process}[_{variation}]`` histograms.

    ``sample_regions`` restricts processes to some regions (all by default); a process in none is left out.
    """
    regions_of = {p: list(REGIONS) for p in PROCESSES}
    regions_of |= {p: list(r) for p, r in (sample_regions or {}).items()}
    mc = [p for p in PROCESSES if regions_of[p]]
    config: dict[str, Any] = {
        "General": {
            "Measurement": MEASUREMENT,
            "POI": POI,
            "HistogramFolder": str(histogram_folder),
            "InputPath": f"{input_file}:{{RegionPath}}_{{SamplePath}}{{VariationPath}}",
            "VariationPath": "",
        },
        "Regions": [
            {
                "Name": region,
                "RegionPath": region,
                "Variable": _OBSERVABLE_LABELS.get(OBSERVABLES[region], OBSERVABLES[region]),
                "Binning": _fit_edges().tolist(),
            }
            for region in REGIONS
        ],
        "Samples": [{"Name": DATA_SAMPLE, "SamplePath": DATA_SAMPLE, "Data": True}]
        + [_sample_entry(p, regions_of[p]) for p in mc],
        "NormFactors": [
            {"Name": POI, "Samples": "ttbar", "Nominal": POI_NOMINAL, "Bounds": list(POI_BOUNDS)}
        ],
        "Systematics": [],
    }
    for s in systematics():
        samples = [p for p in s.samples if p in mc]
        if not samples:
            continue
        entry: dict[str, Any] = {"Name": s.name}
        if s.normalization is not None:
            entry.update(
                Up={"Normalization": s.normalization},
                Down={"Normalization": -s.normalization},
                Type="Normalization",
            )
        else:
            assert s.up is not None
            entry["Up"] = {"VariationPath": f"_{s.up}"}
            entry["Down"] = {"VariationPath": f"_{s.down}"} if s.down else {"Symmetrize": True}
            entry["Type"] = "NormPlusShape"
        entry["Samples"] = samples if len(samples) > 1 else samples[0]
        config["Systematics"].append(entry)
    return config


def _sample_entry(process: str, regions: Sequence[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"Name": process, "SamplePath": process}
    if len(regions) < len(REGIONS):
        entry["Regions"] = list(regions)
    return entry


def validate_config(config: dict[str, Any]) -> None:
    """Check ``config`` with cabinetry's schema and extra checks; raise :class:`FitError` if invalid."""
    import cabinetry
    import jsonschema

    try:
        cabinetry.configuration.validate(config)
    except (jsonschema.ValidationError, ValueError, NotImplementedError) as err:
        msg = getattr(err, "message", str(err))
        raise FitError(f"invalid cabinetry configuration: {msg}") from err


def _fit_edges() -> np.ndarray:
    """Bin edges of the fit: 40 GeV bins from 110 to 550 GeV (rebinned 20 GeV bins of ``histograms.root``)."""
    lo, hi = FIT_RANGE
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / HIST_BINS * FIT_REBIN
    return np.linspace(lo, hi, round((hi - lo) / width) + 1)


@dataclass(frozen=True)
class FitInputs:
    """What :func:`write_fit_inputs` wrote, and where it had to deviate from the full model."""

    path: Path
    #: regions in which each process has a positive yield in the fit range (it is left out of the others)
    sample_regions: dict[str, tuple[str, ...]]
    #: variation keys absent from the input (zero sum) or without a positive yield in the fit range
    substituted: tuple[str, ...]


def write_fit_inputs(histograms: Path, target: Path) -> FitInputs:
    """Write the rebinned histograms the model needs to ``target``.

    A variation histogram is absent when its sum of weights is zero; its nominal is written in its place so
    that the modifier exists but has no effect, and the substitution is reported. The same holds for a
    variation without a positive yield in the fit range (its normalisation effect would be log(0)). A process
    without a positive yield in the fit range of a region is left out of that region (HistFactory cannot
    normalise it).
    """
    import hist

    if not histograms.is_file():
        raise FitError(f"{histograms}: no such file")
    edges = _fit_edges()
    substituted: list[str] = []
    out: dict[str, Histogram1D] = {}
    try:
        f = uproot.open(histograms)
    except Exception as err:
        raise FitError(f"{histograms}: not a readable ROOT file ({' '.join(str(err).split())})") from err

    def load(key: str) -> Histogram1D:
        h = read_histogram(f, key, histograms)
        try:
            rebinned = rebin_for_fit(h)
        except FitError as err:
            raise FitError(f"{histograms}: histogram '{key}': {err}") from None
        if len(rebinned.edges) != len(edges) or not np.allclose(rebinned.edges, edges):
            raise FitError(f"{histograms}: histogram '{key}' does not rebin to the fit binning "
                           f"({len(edges) - 1} bins from {edges[0]:g} to {edges[-1]:g} GeV)")
        return rebinned

    with f:
        present = set(f.keys(cycle=False))
        for region, nominals in read_nominals(f, REGIONS, histograms).items():
            for process in nominals:
                key = histogram_key(region, process)
                out[key] = load(key) if key in present else _zeros(edges)
        for key in optional_keys():
            region, process = _nominal_of(key)
            nominal = out[histogram_key(region, process)]
            h = load(key) if key in present else None
            if h is None or (h.values.sum() <= 0 < nominal.values.sum()):
                out[key] = nominal
                substituted.append(key)
            else:
                out[key] = h
    sample_regions = {
        p: tuple(r for r in REGIONS if out[histogram_key(r, p)].values.sum() > 0) for p in PROCESSES
    }
    if not sample_regions["ttbar"]:
        lo, hi = FIT_RANGE
        raise FitError(f"{histograms}: ttbar has no events in the fit range ({lo:g}-{hi:g} GeV)")
    with atomic_path(target) as tmp, uproot.recreate(tmp) as w:
        for key, h in out.items():
            bh = hist.Hist(hist.axis.Variable(h.edges), storage=hist.storage.Weight())
            view = bh.view(flow=False)
            view.value = h.values
            view.variance = h.variances
            w[key] = bh
    if substituted:
        log.info("%d variation histograms absent or empty, nominal used: %s", len(substituted),
                 ", ".join(substituted))
    return FitInputs(path=target, sample_regions=sample_regions, substituted=tuple(substituted))


def _left_out(sample_regions: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    return tuple(
        histogram_key(r, p) for p, regions in sample_regions.items() for r in REGIONS if r not in regions
    )


def _nominal_of(key: str) -> tuple[str, str]:
    for region in REGIONS:
        for process in PROCESSES:
            if key.startswith(f"{region}_{process}_"):
                return region, process
    raise AssertionError(key)  # pragma: no cover - keys come from optional_keys()


# --- the fit ------------------------------------------------------------------------------------------------


def run_fit(histograms: Path, output_dir: Path, *, interval: str = "minos", plots: bool = True) -> FitResult:
    """Build the model from ``histograms``, fit ``ttbar_norm``; write config, workspace, results, plots."""
    if interval not in INTERVALS:
        raise FitError(f"unknown interval method '{interval}' (choose from {', '.join(INTERVALS)})")
    import cabinetry
    import pyhf

    histograms = Path(histograms)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs = write_fit_inputs(histograms, output_dir / INPUTS_NAME)
    config = build_config(inputs.path, output_dir / TEMPLATES_DIR, inputs.sample_regions)
    validate_config(config)
    config_path = output_dir / CONFIG_NAME
    atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))

    cabinetry.templates.collect(config)
    cabinetry.templates.postprocess(config)
    ws = cabinetry.workspace.build(config)
    workspace_path = output_dir / WORKSPACE_NAME
    atomic_write_text(workspace_path, json.dumps(ws, indent=1, sort_keys=True) + "\n")

    model, data = cabinetry.model_utils.model_and_data(ws)
    poi_index = model.config.poi_index
    try:
        fit_results = cabinetry.fit.fit(model, data, minos=[POI] if interval == "minos" else None)
        value = float(fit_results.bestfit[poi_index])
        hesse = float(fit_results.uncertainty[poi_index])
        if interval == "minos":
            down, up = fit_results.minos_uncertainty[POI]
            err_down, err_up = -float(down), float(up)
        else:
            twice_nll = float(fit_results.best_twice_nll)
            lo, hi = profile_interval(model, data, fit_results.bestfit, twice_nll, hesse)
            err_down, err_up = value - lo, hi - value
    except pyhf.exceptions.FailedMinimization as err:
        raise FitError(f"the fit did not converge ({histograms}): {str(err).splitlines()[0]}") from err

    plot_paths = _fit_plots(model, data, fit_results, config, output_dir) if plots else ()
    result = FitResult(
        value=value, error_up=err_up, error_down=err_down, interval=interval, hesse_error=hesse,
        output_dir=output_dir, results=output_dir / RESULTS_NAME, config=config_path,
        workspace=workspace_path, plots=plot_paths, substituted=inputs.substituted,
        left_out=_left_out(inputs.sample_regions),
    )
    _write_results(result, fit_results, histograms)
    return result


def profile_interval(model: Any, data: Sequence[float], bestfit: Sequence[float] | np.ndarray,
                     best_twice_nll: float, step: float) -> tuple[float, float]:
    """Where the profile likelihood of the POI rises by Δ(−2 ln L) = 1 on either side of the best fit.

    Each point is a fit with the POI fixed, started from the global best fit. The crossing of
    sqrt(Δ(−2 ln L)) = 1 (close to linear in the POI, so Brent's method needs few points) is bracketed by
    growing steps from ``step`` (e.g. the Hesse error) and then solved to 1e-4; an interval reaching a
    parameter bound ends there. Unlike a scan on a grid, the result does not depend on the grid.
    """
    import pyhf
    from scipy.optimize import brentq

    pyhf.set_backend(pyhf.tensorlib, pyhf.optimize.minuit_optimizer(verbose=0))
    data_t = pyhf.tensorlib.astensor(data)
    poi = model.config.poi_index
    best = float(bestfit[poi])
    bounds = model.config.suggested_bounds()[poi]
    cache: dict[float, float] = {best: -1.0}

    def distance(mu: float) -> float:
        if mu not in cache:
            init = [float(x) for x in bestfit]
            init[poi] = mu
            _, twice_nll = pyhf.infer.mle.fixed_poi_fit(mu, data_t, model, init_pars=init,
                                                         return_fitted_val=True)
            cache[mu] = math.sqrt(max(float(twice_nll) - best_twice_nll, 0.0)) - 1.0
        return cache[mu]

    def crossing(direction: int) -> float:
        edge = float(bounds[1] if direction > 0 else bounds[0])
        delta = 1.5 * max(abs(step), 1e-3)
        inner = best
        while True:
            outer = best + direction * delta
            if (outer - edge) * direction >= 0:
                outer = edge
                if distance(outer) < 0:
                    return edge  # the interval reaches the parameter bound
            elif distance(outer) < 0:
                inner, delta = outer, 2 * delta
                continue
            a, b = sorted((inner, outer))
            return float(brentq(distance, a, b, xtol=1e-4))

    return crossing(-1), crossing(+1)


def _fit_plots(model: Any, data: Sequence[float], fit_results: Any, config: dict[str, Any],
               output_dir: Path) -> tuple[Path, ...]:
    """Pull plot and pre-/post-fit data/MC per region, as PNG (cabinetry draws, we save atomically)."""
    import cabinetry
    import matplotlib.pyplot as plt

    saved: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = output_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        saved.append(path)

    pulls = cabinetry.visualize.pulls(fit_results, exclude=[POI], save_figure=False, close_figure=False)
    save(pulls, "pulls.png")
    for label, prediction in (
        ("prefit", cabinetry.model_utils.prediction(model)),
        ("postfit", cabinetry.model_utils.prediction(model, fit_results=fit_results)),
    ):
        figures = cabinetry.visualize.data_mc(prediction, list(data), config=config, save_figure=False,
                                              close_figure=False) or []
        for entry in figures:
            save(entry["figure"], f"{entry['region']}_{label}.png")
    return tuple(saved)


def _write_results(result: FitResult, fit_results: Any, histograms: Path) -> None:
    labels = list(fit_results.labels)
    doc = {
        "poi": POI,
        "measurement": MEASUREMENT,
        "bestfit": result.value,
        "interval": {
            "method": result.interval,
            "description": INTERVAL_LABELS[result.interval] + ", Δ(−2 ln L) = 1",
            "up": result.error_up,
            "down": result.error_down,
            "low": result.value - result.error_down,
            "high": result.value + result.error_up,
        },
        "hesse_uncertainty": result.hesse_error,
        "summary": result.summary(),
        "histograms": str(histograms.resolve()),
        "config": result.config.name,
        "workspace": result.workspace.name,
        "plots": [p.name for p in result.plots],
        "substituted_templates": list(result.substituted),
        "samples_left_out": list(result.left_out),
        "twice_nll": float(fit_results.best_twice_nll),
        "parameters": [
            {"label": lab, "bestfit": float(b), "uncertainty": float(u)}
            for lab, b, u in zip(labels, fit_results.bestfit, fit_results.uncertainty, strict=True)
        ],
        "labels": labels,
        "correlation": np.round(np.asarray(fit_results.corr_mat, dtype=float), 6).tolist(),
    }
    atomic_write_text(result.results, json.dumps(doc, indent=1) + "\n")


__all__: list[str] = [
    "INTERVALS",
    "MEASUREMENT",
    "POI",
    "FitError",
    "FitInputs",
    "FitResult",
    "Histogram1D",
    "Systematic",
    "build_config",
    "histogram_key",
    "optional_keys",
    "profile_interval",
    "read_histogram",
    "rebin_for_fit",
    "required_keys",
    "run_fit",
    "systematics",
    "validate_config",
    "write_fit_inputs",
]
