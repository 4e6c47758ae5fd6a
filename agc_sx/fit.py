"""The AGC statistical model: a cabinetry configuration built from ``histograms.root``, and the fit.

The model follows the AGC v2 ``cabinetry_config.yml``: both regions rebinned to 11 bins of 40 GeV from
110 GeV (the AGC's ``h[110j::hist.rebin(2)]``, which already drops the sparse low edge of HT and m_bjj),
ttbar scaled by the free ``ttbar_norm``, and the AGC systematics as HistFactory modifiers. cabinetry reads
ROOT histograms through a path template, so we first write the rebinned histograms (and nothing else) into
the output folder and point the generated configuration at that file; the fit sees the binning the plots show.

What makes this model numerically fragile on toy inputs, and what we do about it (``write_fit_inputs``):

* A variation estimated from a handful of simulated events is mostly MC noise: one event moving across a
  bin edge doubles a bin or empties it. Symmetrised (``2 x nominal - up``, the AGC's choice for ME, PS, JES
  and JER) such a bin goes negative, the expected yield of the bin becomes negative beyond one sigma of the
  nuisance parameter, and Minuit reports ``FCN result is NaN`` and gives up. So each variation is limited to
  a 100 % effect per bin (``0 <= variation <= 2 x nominal``): templates stay non-negative both ways, and a
  variation cannot put events where the nominal has none.
* A sample with fewer than :data:`MIN_EFFECTIVE_EVENTS` effective simulated events in a region (W+jets or
  s-channel single top in a small run) has no measurable systematic shape there: its variations are
  replaced by its nominal (reported as pruned) and its MC statistical uncertainty, which the model keeps,
  covers it. A variation whose total becomes zero or negative would otherwise make a log(0) normalisation.
* A bin with pseudodata but no prediction at all cannot be fitted; it is reported, not fitted.

The minimisation's status is recorded (Migrad converged, covariance accurate or forced positive-definite,
parameters at their bounds); a fit that did not converge is an error, never a result. The interval on
``ttbar_norm`` is MINOS by default. MINOS fails on such inputs by returning the Hesse error with its
``is_valid`` flag down (cabinetry passes the numbers on regardless), so its validity is checked and, when it
failed, the interval comes from the profile likelihood solved for its Δ(−2 ln L) = 1 crossings, and the
summary and ``fit_results.json`` say so. On systematics-dominated inputs Minuit's Hesse error is not
trustworthy (it jumps by an order of magnitude between pseudodata sets), so it is only recorded for reference.
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
from .errors import FitError
from .histograms import (
    ALWAYS_PRESENT,
    DATA_SAMPLE,
    OBSERVABLE_LABELS,
    Histogram1D,
    hist_key,
    read_histogram,
    read_nominals,
    rebin_for_fit,
    zero_histogram,
)
from .utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Name of the HistFactory measurement and of the parameter of interest (AGC v2).
MEASUREMENT = "CMS_ttbar"
POI = "ttbar_norm"
POI_NOMINAL = 1.0
POI_BOUNDS = (0.0, 10.0)
#: Ways to quote the ``ttbar_norm`` interval; both are profile-likelihood based (Δ(−2 ln L) = 1).
INTERVALS = ("minos", "profile")
INTERVAL_LABELS = {"minos": "MINOS", "profile": "profile-likelihood interval"}
#: Function calls allowed to one fit of the profile likelihood (a clean one takes 1,000-4,000): a start that
#: leaves Migrad wandering is given up quickly and redone from the nominal starting point.
PROFILE_MAXITER = 10000
#: Below this many effective simulated events, (sum w)^2 / sum w^2 in the fit range, a sample's variations
#: in a region are pruned: its systematic shapes would be MC noise.
MIN_EFFECTIVE_EVENTS = 10.0

#: Names of the files ``run_fit`` writes into its output folder.
CONFIG_NAME = "cabinetry_config.yml"
INPUTS_NAME = "histograms_rebinned.root"
TEMPLATES_DIR = "templates"
WORKSPACE_NAME = "workspace.json"
RESULTS_NAME = "fit_results.json"

@dataclass(frozen=True)
class Minimum:
    """What Minuit says about the minimum: a result is only as good as these flags."""

    converged: bool  #: Migrad's minimum is valid (EDM below its goal, no call limit reached)
    covariance_accurate: bool  #: Hesse's matrix is accurate (not approximated, not forced positive-definite)
    covariance_forced: bool  #: Minuit had to force the matrix positive-definite
    edm: float
    function_calls: int
    at_limit: tuple[str, ...]  #: parameters at one of their bounds

    @classmethod
    def of(cls, minuit: Any) -> Minimum:
        """The flags of ``minuit``'s last minimisation."""
        fmin = minuit.fmin
        return cls(
            converged=bool(fmin.is_valid), covariance_accurate=bool(fmin.has_accurate_covar),
            covariance_forced=bool(fmin.has_made_posdef_covar), edm=float(fmin.edm),
            function_calls=int(fmin.nfcn), at_limit=tuple(p.name for p in minuit.params if _at_limit(p)),
        )

    def problem(self) -> str:
        """Why the minimum is not valid, in words (empty when it is)."""
        if self.converged:
            return ""
        why = [f"estimated distance to the minimum {self.edm:.3g} above its goal"]
        if self.at_limit:
            why.append("at their bounds: " + ", ".join(self.at_limit))
        return "; ".join(why)

    def as_dict(self) -> dict[str, Any]:
        """The flags as ``fit_results.json`` records them."""
        return {
            "converged": self.converged, "covariance_accurate": self.covariance_accurate,
            "covariance_forced_positive_definite": self.covariance_forced, "edm": self.edm,
            "function_calls": self.function_calls, "parameters_at_limit": list(self.at_limit),
        }


def _at_limit(p: Any) -> bool:
    """A free parameter within 0.1 % of its range from one of its bounds."""
    if p.is_fixed or p.lower_limit is None or p.upper_limit is None:
        return False
    tolerance = 1e-3 * (p.upper_limit - p.lower_limit)
    return bool(min(p.value - p.lower_limit, p.upper_limit - p.value) <= tolerance)


@dataclass(frozen=True)
class FitResult:
    """Best fit and interval of ``ttbar_norm`` plus where everything was written."""

    value: float
    error_up: float  #: positive distance from ``value`` to the upper end of the interval
    error_down: float  #: positive distance from ``value`` to the lower end of the interval
    interval: str  #: the method that produced the interval, one of :data:`INTERVALS`
    hesse_error: float  #: Minuit's parabolic error, for reference only
    minimum: Minimum
    output_dir: Path
    results: Path
    config: Path
    workspace: Path
    #: why MINOS, when asked for, did not give the interval (the profile likelihood did); None if it did
    minos_failure: str | None = None
    plots: tuple[Path, ...] = ()
    #: optional templates absent from the input or empty in the fit range (their nominal was used)
    substituted: tuple[str, ...] = field(default=())
    #: ``{region}_{process}`` without events in the fit range, left out of that region
    left_out: tuple[str, ...] = field(default=())
    #: variation histograms replaced by their nominal: too few simulated events to carry a shape
    pruned: tuple[str, ...] = field(default=())
    #: variation histograms with bins limited to a 100 % effect
    capped: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """One line for humans, e.g. ``ttbar_norm = 1.300 +0.131 -0.112 (MINOS)``."""
        label = INTERVAL_LABELS[self.interval]
        if self.minos_failure is not None:
            label += ", MINOS failed"
        if math.isclose(self.error_up, self.error_down, rel_tol=5e-3):
            return f"{POI} = {self.value:.3f} ± {self.error_up:.3f} ({label})"
        return f"{POI} = {self.value:.3f} +{self.error_up:.3f} -{self.error_down:.3f} ({label})"


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


def required_keys() -> list[str]:
    """Histograms the fit cannot do without: the pseudodata and the ttbar nominal, per region."""
    return [hist_key(r, p) for r in REGIONS for p in ALWAYS_PRESENT]


def optional_keys() -> list[str]:
    """Variation histograms of the model; an absent one (zero sum, not written) means 'no effect'."""
    keys = []
    for r in REGIONS:
        for s in systematics():
            for p in s.samples:
                keys += [hist_key(r, p, v) for v in (s.up, s.down) if v is not None]
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
                "Variable": OBSERVABLE_LABELS.get(OBSERVABLES[region], OBSERVABLES[region]),
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
    #: variation keys replaced by their nominal: fewer than MIN_EFFECTIVE_EVENTS simulated events
    pruned: tuple[str, ...] = ()
    #: variation keys with bins limited to a 100 % effect (0 <= variation <= 2 x nominal)
    capped: tuple[str, ...] = ()


def effective_events(h: Histogram1D) -> float:
    """(sum w)^2 / sum w^2: how many unweighted simulated events the histogram is worth."""
    variance = float(h.variances.sum())
    return float(h.values.sum()) ** 2 / variance if variance > 0 else 0.0


def _cap(variation: Histogram1D, nominal: Histogram1D) -> Histogram1D:
    """The variation with every bin limited to a 100 % effect: 0 <= variation <= 2 x nominal."""
    values = np.clip(variation.values, 0.0, 2.0 * np.maximum(nominal.values, 0.0))
    return Histogram1D(values=values, variances=variation.variances, edges=variation.edges)


def write_fit_inputs(histograms: Path, target: Path) -> FitInputs:
    """Write the rebinned histograms the model needs to ``target``, guarded as the module docstring says.

    A variation histogram is absent when its sum of weights is zero; its nominal is written in its place so
    that the modifier exists but has no effect, and the substitution is reported. The same holds for a
    variation without a positive yield in the fit range (its normalisation effect would be log(0)), and for
    the variations of a sample with fewer than :data:`MIN_EFFECTIVE_EVENTS` effective events in the region
    (pruned). The other variations are limited to a 100 % effect per bin (capped). A process without a
    positive yield in the fit range of a region is left out of that region (HistFactory cannot normalise
    it); a bin with pseudodata but nothing predicted is a :class:`FitError`.
    """
    import hist

    if not histograms.is_file():
        raise FitError(f"{histograms}: no such file")
    edges = _fit_edges()
    substituted: list[str] = []
    pruned: list[str] = []
    capped: list[str] = []
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
                key = hist_key(region, process)
                out[key] = load(key) if key in present else zero_histogram(edges)
        for key in optional_keys():
            region, process = _nominal_of(key)
            nominal = out[hist_key(region, process)]
            h = load(key) if key in present else None
            if h is None or (h.values.sum() <= 0 < nominal.values.sum()):
                out[key] = nominal
                substituted.append(key)
            elif nominal.values.sum() > 0 and effective_events(nominal) < MIN_EFFECTIVE_EVENTS:
                out[key] = nominal
                pruned.append(key)
            else:
                out[key] = _cap(h, nominal)
                if not np.array_equal(out[key].values, h.values):
                    capped.append(key)
    sample_regions = {
        p: tuple(r for r in REGIONS if out[hist_key(r, p)].values.sum() > 0) for p in PROCESSES
    }
    if not sample_regions["ttbar"]:
        lo, hi = FIT_RANGE
        raise FitError(f"{histograms}: ttbar has no events in the fit range ({lo:g}-{hi:g} GeV)")
    for region in REGIONS:
        predicted = sum(out[hist_key(region, p)].values for p in PROCESSES)
        empty = (predicted <= 0) & (out[hist_key(region, DATA_SAMPLE)].values > 0)
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise FitError(f"{histograms}: {region} bin {edges[i]:g}-{edges[i + 1]:g} GeV has pseudodata but "
                           "no simulated events of any process: too few events to fit (generate more)")
    with atomic_path(target) as tmp, uproot.recreate(tmp) as w:
        for key, h in out.items():
            bh = hist.Hist(hist.axis.Variable(h.edges), storage=hist.storage.Weight())
            view = bh.view(flow=False)
            view.value = h.values
            view.variance = h.variances
            w[key] = bh
    for what, keys in (("absent or empty, nominal used", substituted),
                       (f"pruned (fewer than {MIN_EFFECTIVE_EVENTS:g} effective events)", pruned),
                       ("capped at a 100 % effect per bin", capped)):
        if keys:
            log.info("%d variation histograms %s: %s", len(keys), what, ", ".join(keys))
    return FitInputs(path=target, sample_regions=sample_regions, substituted=tuple(substituted),
                     pruned=tuple(pruned), capped=tuple(capped))


def _left_out(sample_regions: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    return tuple(
        hist_key(r, p) for p, regions in sample_regions.items() for r in REGIONS if r not in regions
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
    fit_results, minuit = _minimise(model, data)
    minimum = Minimum.of(minuit)
    if fit_results is None:
        _write_failure(output_dir / RESULTS_NAME, minimum, histograms)
        raise FitError(f"the fit did not converge ({histograms}): {minimum.problem()}")
    value = float(fit_results.bestfit[poi_index])
    hesse = float(fit_results.uncertainty[poi_index])
    minos_failure = None
    if interval == "minos":
        minos = _minos(minuit, POI)
        if isinstance(minos, str):
            minos_failure = minos
            log.warning("MINOS failed for %s (%s): using the profile-likelihood interval", POI, minos)
        else:
            err_down, err_up = minos
    if interval == "profile" or minos_failure is not None:
        lo, hi = profile_interval(model, data, fit_results.bestfit, float(fit_results.best_twice_nll), hesse)
        err_down, err_up = value - lo, hi - value

    plot_paths = _fit_plots(model, data, fit_results, config, output_dir) if plots else ()
    result = FitResult(
        value=value, error_up=err_up, error_down=err_down,
        interval="profile" if minos_failure is not None else interval, hesse_error=hesse, minimum=minimum,
        minos_failure=minos_failure, output_dir=output_dir, results=output_dir / RESULTS_NAME,
        config=config_path, workspace=workspace_path, plots=plot_paths, substituted=inputs.substituted,
        left_out=_left_out(inputs.sample_regions), pruned=inputs.pruned, capped=inputs.capped,
    )
    _write_results(result, fit_results, histograms)
    return result


def _minimise(model: Any, data: Sequence[float]) -> tuple[Any | None, Any]:
    """Migrad and Hesse through pyhf, as ``cabinetry.fit.fit`` runs them, keeping the Minuit object.

    cabinetry's fit raises on an invalid minimum and keeps Minuit's status to itself; the status is what
    tells a result from a number, so we run the same pyhf call and build cabinetry's ``FitResults`` (for its
    plots) ourselves. A failed minimisation gives no ``FitResults``, only Minuit in its last state.
    """
    import cabinetry
    import pyhf

    backend, optimizer = pyhf.get_backend()
    pyhf.set_backend(backend, pyhf.optimize.minuit_optimizer(verbose=0))
    try:
        result, corr, twice_nll, obj = pyhf.infer.mle.fit(
            data, model, return_uncertainties=True, return_correlations=True, return_fitted_val=True,
            return_result_obj=True)
    except pyhf.exceptions.FailedMinimization as err:
        return None, err.result.minuit
    finally:
        pyhf.set_backend(backend, optimizer)
    minuit = obj.minuit
    uncertainty = np.where(minuit.fixed, 0.0, pyhf.tensorlib.to_numpy(result[:, 1]))
    return cabinetry.fit.FitResults(
        pyhf.tensorlib.to_numpy(result[:, 0]), uncertainty, list(model.config.par_names),
        pyhf.tensorlib.to_numpy(corr), float(twice_nll),
    ), minuit


def _minos(minuit: Any, name: str) -> tuple[float, float] | str:
    """MINOS distances (down, up) of ``name``, or why MINOS failed.

    Minuit2 does not raise when a crossing is not found: it flags the error invalid and returns the Hesse
    error in its place, which cabinetry reports as the MINOS interval. Hence the flags are read here.
    """
    minuit.minos(name)
    me = minuit.merrors[name]
    if me.is_valid:
        return -float(me.lower), float(me.upper)
    why = []
    for side, valid, max_fcn, new_min in (("lower", me.lower_valid, me.at_lower_max_fcn, me.lower_new_min),
                                          ("upper", me.upper_valid, me.at_upper_max_fcn, me.upper_new_min)):
        if valid:
            continue
        reason = "call limit reached" if max_fcn else "found a new minimum" if new_min else "no crossing found"
        why.append(f"{side} crossing: {reason}")
    return "; ".join(why) or "invalid"


def profile_interval(model: Any, data: Sequence[float], bestfit: Sequence[float] | np.ndarray,
                     best_twice_nll: float, step: float) -> tuple[float, float]:
    """Where the profile likelihood of the POI rises by Δ(−2 ln L) = 1 on either side of the best fit.

    Each point is a fit with the POI fixed, started from the fitted parameters of the nearest point already
    computed (the global best fit at first). On sparse toys such a start can leave Migrad wandering through a
    region where some bin's expected yield is negative; the fit is then redone from the model's nominal
    starting point, and if that fails too the interval is a :class:`FitError`, never a guess. The crossing of
    sqrt(Δ(−2 ln L)) = 1 (close to linear in the POI, so Brent's method needs few points) is bracketed by
    doubling steps from ``step`` (e.g. the Hesse error) and then solved to 1e-4; an interval reaching a
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
    fitted: dict[float, list[float]] = {best: [float(x) for x in bestfit]}

    def fixed_fit(mu: float, start: Sequence[float]) -> tuple[Any, float]:
        init = [float(x) for x in start]
        init[poi] = mu
        pars, twice_nll = pyhf.infer.mle.fixed_poi_fit(mu, data_t, model, init_pars=init, return_fitted_val=True,
                                                       maxiter=PROFILE_MAXITER)
        return pars, float(twice_nll)

    def distance(mu: float) -> float:
        if mu not in cache:
            nearest = fitted[min(fitted, key=lambda m: abs(m - mu))]
            try:
                pars, twice_nll = fixed_fit(mu, nearest)
            except pyhf.exceptions.FailedMinimization:
                try:
                    pars, twice_nll = fixed_fit(mu, model.config.suggested_init())
                except pyhf.exceptions.FailedMinimization as err:
                    raise FitError(f"profile likelihood: the fit with {POI} fixed at {mu:.3f} did not "
                                   "converge") from err
            fitted[mu] = [float(x) for x in pars]
            cache[mu] = math.sqrt(max(twice_nll - best_twice_nll, 0.0)) - 1.0
        return cache[mu]

    def crossing(direction: int) -> float:
        edge = float(bounds[1] if direction > 0 else bounds[0])
        delta = max(abs(step), 1e-3)  # one step from the best fit, then each point warm-starts the next
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


def _write_failure(path: Path, minimum: Minimum, histograms: Path) -> None:
    """A ``fit_results.json`` that says the fit failed: an older result in the folder must not pass for it."""
    doc = {"poi": POI, "measurement": MEASUREMENT, "minimisation": minimum.as_dict(), "bestfit": None,
           "interval": None, "summary": f"the fit did not converge: {minimum.problem()}",
           "histograms": str(histograms.resolve())}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def _write_results(result: FitResult, fit_results: Any, histograms: Path) -> None:
    labels = list(fit_results.labels)
    doc = {
        "poi": POI,
        "measurement": MEASUREMENT,
        "minimisation": result.minimum.as_dict(),
        "bestfit": result.value,
        "interval": {
            "method": result.interval,
            "minos_failure": result.minos_failure,
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
        "pruned_templates": list(result.pruned),
        "capped_templates": list(result.capped),
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
    "Minimum",
    "Systematic",
    "build_config",
    "effective_events",
    "optional_keys",
    "profile_interval",
    "required_keys",
    "run_fit",
    "systematics",
    "validate_config",
    "write_fit_inputs",
]
