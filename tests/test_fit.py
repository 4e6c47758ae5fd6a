"""The cabinetry fit on synthetic ``histograms.root`` files with a known ttbar signal strength."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import hist
import numpy as np
import pytest
import uproot
import yaml
from click.testing import CliRunner

from agc_sx.cli import main
from agc_sx.constants import (
    BTAG_VARIATIONS,
    HIST_BINS,
    HIST_RANGE,
    PROCESSES,
    REGIONS,
    TTBAR_ALTERNATIVES,
    WJETS_SCALE_DOWN,
    WJETS_SCALE_UP,
    WJETS_SCALE_VARIATIONS,
)
from agc_sx.fit import (
    POI,
    FitError,
    build_config,
    optional_keys,
    required_keys,
    run_fit,
    validate_config,
)
from agc_sx.histograms import read_histogram, rebin_for_fit

EDGES = np.linspace(*HIST_RANGE, HIST_BINS + 1)
CENTRES = 0.5 * (EDGES[1:] + EDGES[:-1])


def _lognormal(peak: float, width: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.exp(-0.5 * ((np.log(x) - np.log(peak)) / width) ** 2) / x


def _peak_on_tail(peak: float, width: float, tail: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.exp(-0.5 * ((x - peak) / width) ** 2) + tail * np.exp(-(x - 50) / 150)


# (yield, shape) per region and process: ttbar peaks (HT ~ 330 GeV; m_bjj ~ 170 GeV on a combinatorial tail),
# W+jets falls, single top sits in between. Yields are in the ratio of the AGC's 4j1b / 4j2b regions.
_SHAPES = {
    "4j1b": {
        "ttbar": (12000.0, _lognormal(330, 0.28)),
        "wjets": (6000.0, _lognormal(230, 0.35)),
        "single_top_s_chan": (60.0, _lognormal(280, 0.3)),
        "single_top_t_chan": (900.0, _lognormal(270, 0.3)),
        "single_top_tW": (1100.0, _lognormal(310, 0.3)),
    },
    "4j2b": {
        "ttbar": (7000.0, _peak_on_tail(170, 25, 0.6)),
        "wjets": (300.0, lambda x: np.exp(-(x - 50) / 90)),
        "single_top_s_chan": (40.0, _peak_on_tail(175, 40, 0.3)),
        "single_top_t_chan": (250.0, _peak_on_tail(175, 40, 0.5)),
        "single_top_tW": (500.0, _peak_on_tail(172, 30, 0.5)),
    },
}
#: Weight per simulated event, for the sum of squared weights (ttbar well simulated, W+jets poorly).
_EVENT_WEIGHT = {"ttbar": 0.05, "wjets": 0.6, "single_top_s_chan": 0.01, "single_top_t_chan": 0.05,
                 "single_top_tW": 0.03}


def _template(region: str, process: str, scale: float = 1.0) -> np.ndarray:
    """Expected bin contents of ``process``, the observable scaled by ``scale`` (a jet energy scale shift)."""
    total, shape = _SHAPES[region][process]
    fine = np.linspace(*HIST_RANGE, 20 * HIST_BINS + 1)
    x = 0.5 * (fine[1:] + fine[:-1])
    varied = shape(x / scale) / scale
    return varied.reshape(HIST_BINS, 20).sum(axis=1) * total / shape(x).sum()


def toy_histograms(mu: float = 1.3) -> dict[str, np.ndarray]:
    """Every histogram ``process`` writes, as expected contents: nominal, all variations, pseudodata."""
    out: dict[str, np.ndarray] = {}
    rel = (CENTRES - 300.0) / 250.0  # -1 .. +1 across the range
    for region in REGIONS:
        data = np.zeros(HIST_BINS)
        for process in PROCESSES:
            nominal = _template(region, process)
            key = f"{region}_{process}"
            out[key] = nominal
            data += nominal * (mu if process == "ttbar" else 1.0)
            # jet energy scale: +3 % on jet pT moves the spectrum up and lets more events pass
            out[f"{key}_pt_scale_up"] = _template(region, process, 1.03) * 1.05
            # resolution: a slight broadening
            out[f"{key}_pt_res_up"] = nominal * (1.0 + 0.04 * rel**2 - 0.01)
            for name in BTAG_VARIATIONS:
                i, sign = int(name.split("_")[2]), 1.0 if name.endswith("up") else -1.0
                out[f"{key}_{name}"] = nominal * (1.0 + sign * 0.01 * (i + 1) * (1.2 + rel))
            if process == "wjets":
                up, down = WJETS_SCALE_VARIATIONS
                out[f"{key}_{up}"] = nominal * WJETS_SCALE_UP
                out[f"{key}_{down}"] = nominal * WJETS_SCALE_DOWN
            if process == "ttbar":
                alt = {"ME_var": 1.0 + 0.06 * rel, "PS_var": 0.97 - 0.03 * rel**2,
                       "scaleup": 1.0 - 0.02 + 0.01 * rel, "scaledown": 1.0 + 0.02 - 0.01 * rel}
                assert set(alt) == set(TTBAR_ALTERNATIVES)
                for name, factor in alt.items():
                    out[f"{key}_{name}"] = nominal * factor
        out[f"{region}_pseudodata"] = data
    return out


def _variance(key: str, values: np.ndarray) -> np.ndarray:
    process = next((p for p in PROCESSES if key.split("_", 1)[1].startswith(p)), None)
    return values * (_EVENT_WEIGHT[process] if process else 0.05)


def write_toy_histograms(path: Path, *, mu: float = 1.3, drop: Iterable[str] = (), seed: int | None = None,
                         extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write the toy histograms to ``path`` as TH1D with sumw2, like ``agc-sx process`` does.

    ``seed`` Poisson-fluctuates the pseudodata; ``drop`` leaves keys out (as the processor does empty ones).
    Returns what was written.
    """
    contents = toy_histograms(mu)
    if seed is not None:
        rng = np.random.default_rng(seed)
        for region in REGIONS:
            contents[f"{region}_pseudodata"] = rng.poisson(contents[f"{region}_pseudodata"]).astype(float)
    contents.update(extra or {})
    for key in drop:
        contents.pop(key)
    with uproot.recreate(path) as f:
        for key, values in contents.items():
            h = hist.Hist(hist.axis.Regular(len(values), EDGES[0], EDGES[-1], name="observable"),
                          storage=hist.storage.Weight())
            h.view().value = values
            h.view().variance = _variance(key, values)
            f[key] = h
    return contents


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "histograms.root"
    write_toy_histograms(path, mu=1.3)
    return path


def test_toy_file_has_every_key_the_fit_reads(toy_file: Path) -> None:
    with uproot.open(toy_file) as f:
        present = set(f.keys(cycle=False))
    assert set(required_keys()) <= present
    assert set(optional_keys()) <= present


def test_rebin_merges_pairs_from_110(toy_file: Path) -> None:
    with uproot.open(toy_file) as f:
        h = read_histogram(f, "4j1b_ttbar")
    r = rebin_for_fit(h)
    assert r.edges.tolist() == [110.0 + 40.0 * i for i in range(12)]
    assert r.values[0] == pytest.approx(h.values[3] + h.values[4])
    assert r.variances[-1] == pytest.approx(h.variances[-2] + h.variances[-1])
    assert r.values.sum() == pytest.approx(h.values[3:].sum())


def test_config_validates_and_describes_the_agc_model(tmp_path: Path) -> None:
    config = build_config(tmp_path / "in.root", tmp_path / "templates")
    validate_config(config)  # raises if invalid
    assert config["General"]["Measurement"] == "CMS_ttbar"
    (norm,) = config["NormFactors"]
    assert (norm["Name"], norm["Samples"]) == (POI, "ttbar")
    assert (norm["Nominal"], norm["Bounds"]) == (1.0, [0.0, 10.0])
    assert [r["Name"] for r in config["Regions"]] == list(REGIONS)
    assert [s["Name"] for s in config["Samples"] if s.get("Data")] == ["pseudodata"]
    systs = {s["Name"]: s for s in config["Systematics"]}
    assert systs["ME_var"]["Down"] == {"Symmetrize": True} and systs["ME_var"]["Samples"] == "ttbar"
    assert systs["luminosity"]["Type"] == "Normalization"
    assert systs["luminosity"]["Up"]["Normalization"] == pytest.approx(0.03)
    assert set(systs["pt_res"]["Samples"]) == set(PROCESSES)
    assert systs["wjets_scale_var"]["Samples"] == "wjets"
    assert sum(name.startswith("btag_var_") for name in systs) == 4

    broken = json.loads(json.dumps(config))
    del broken["General"]["Measurement"]
    with pytest.raises(FitError, match="invalid cabinetry configuration"):
        validate_config(broken)


def test_fit_recovers_injected_signal_strength(toy_file: Path, tmp_path: Path) -> None:
    """Pseudodata = 1.3 x ttbar + backgrounds (no fluctuation): fit gives 1.3, inside its MINOS interval."""
    out = tmp_path / "fit"
    result = run_fit(toy_file, out)
    assert result.interval == "minos"
    assert result.value == pytest.approx(1.3, abs=0.01)
    assert 0.005 < result.error_down < 0.5 and 0.005 < result.error_up < 0.5
    assert result.value - result.error_down < 1.3 < result.value + result.error_up
    assert not result.substituted

    doc = json.loads(result.results.read_text())
    assert doc["bestfit"] == pytest.approx(result.value)
    assert doc["interval"]["method"] == "minos"
    assert doc["interval"]["low"] == pytest.approx(result.value - result.error_down)
    assert POI in doc["labels"] and len(doc["correlation"]) == len(doc["labels"])
    # the configuration next to the result is the one cabinetry ran, and it validates
    config = yaml.safe_load(result.config.read_text())
    validate_config(config)
    assert Path(config["General"]["InputPath"].split(":")[0]).parent == out.resolve()
    names = {p.name for p in result.plots}
    assert {"pulls.png"} | {f"{r}_{when}.png" for r in REGIONS for when in ("prefit", "postfit")} <= names
    for p in result.plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_profile_scan_on_fluctuated_pseudodata_with_sparse_inputs(tmp_path: Path) -> None:
    """Poisson-fluctuated pseudodata; the profile-likelihood interval covers the injected 1.3.

    The inputs are as sparse as a small run makes them: one optional template absent, one empty in the fit
    range, and a process with no events above 110 GeV in 4j2b (left out of that region, not breaking the fit).
    """
    path = tmp_path / "histograms.root"
    contents = toy_histograms()
    below_fit_range = {k: np.where(np.arange(HIST_BINS) < 3, v, 0.0) for k, v in contents.items()
                       if k.startswith("4j2b_single_top_s_chan")}
    empty_key = "4j1b_single_top_s_chan_btag_var_0_up"
    below_fit_range[empty_key] = np.where(np.arange(HIST_BINS) < 3, contents[empty_key], 0.0)
    dropped = "4j1b_single_top_tW_btag_var_3_down"
    write_toy_histograms(path, mu=1.3, seed=7, drop=[dropped], extra=below_fit_range)

    result = run_fit(path, tmp_path / "fit", interval="profile", plots=False)
    assert set(result.substituted) == {dropped, empty_key}
    assert result.left_out == ("4j2b_single_top_s_chan",)
    assert result.value - 2 * result.error_down < 1.3 < result.value + 2 * result.error_up
    assert 0.005 < result.error_down < 0.5 and 0.005 < result.error_up < 0.5
    assert "profile-likelihood" in result.summary()
    doc = json.loads(result.results.read_text())
    assert doc["interval"]["method"] == "profile" and doc["samples_left_out"] == ["4j2b_single_top_s_chan"]
    config = yaml.safe_load(result.config.read_text())
    validate_config(config)
    (s_chan,) = [s for s in config["Samples"] if s["Name"] == "single_top_s_chan"]
    assert s_chan["Regions"] == ["4j1b"]


def test_missing_required_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "histograms.root"
    write_toy_histograms(path, drop=["4j2b_ttbar"])
    with pytest.raises(FitError, match="'4j2b_ttbar' is missing"):
        run_fit(path, tmp_path / "fit")

    res = CliRunner().invoke(main, ["fit", str(path), "--output-dir", str(tmp_path / "fit")])
    assert res.exit_code != 0
    assert "4j2b_ttbar" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_prints_the_interval(toy_file: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["fit", str(toy_file), "--output-dir", str(tmp_path / "f"), "--no-plots"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith(f"{POI} = "))
    assert "MINOS" in line
    assert (tmp_path / "f" / "fit_results.json").is_file()


def test_background_without_events_in_a_region_reads_as_zero(tmp_path: Path) -> None:
    """The processor does not write zero-sum histograms: W+jets absent from 4j2b is empty, not an error."""
    path = tmp_path / "histograms.root"
    write_toy_histograms(path, drop=[k for k in toy_histograms() if k.startswith("4j2b_wjets")])
    result = run_fit(path, tmp_path / "fit", plots=False)
    assert result.left_out == ("4j2b_wjets",)
    assert abs(result.value - 1.3) < result.error_up + result.error_down

    write_toy_histograms(path, drop=[k for k in toy_histograms() if "_wjets" in k])
    result = run_fit(path, tmp_path / "fit2", plots=False)
    assert set(result.left_out) == {"4j1b_wjets", "4j2b_wjets"}
    config = yaml.safe_load(result.config.read_text())
    assert "wjets" not in [s["Name"] for s in config["Samples"]]


def test_results_record_the_minimisation_status_and_the_interval_method(toy_file: Path, tmp_path: Path) -> None:
    result = run_fit(toy_file, tmp_path / "fit", plots=False)
    doc = json.loads(result.results.read_text())
    assert doc["minimisation"]["converged"] is True
    assert doc["minimisation"]["covariance_accurate"] is True
    assert doc["minimisation"]["parameters_at_limit"] == []
    assert doc["interval"]["method"] == "minos" and doc["interval"]["minos_failure"] is None
    assert result.summary().endswith("(MINOS)")


def _failing_minos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make MINOS fail as Minuit2 does on sparse toys: no exception, both crossings flagged invalid, and the
    Hesse error returned in their place (seen on a 2,000-event demo, seed 3: ``-0.198 / +0.198``)."""
    import dataclasses

    from iminuit import Minuit

    real = Minuit.minos

    def minos(self: Minuit, *names: str, **kwargs: object) -> Minuit:
        real(self, *names, **kwargs)
        for name in names:
            hesse = self.errors[name]
            self._merrors[name] = dataclasses.replace(
                self.merrors[name], lower=-hesse, upper=hesse, is_valid=False, lower_valid=False,
                upper_valid=False)
        return self

    monkeypatch.setattr(Minuit, "minos", minos)


def test_a_failed_minos_is_never_labelled_minos(toy_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    profile = run_fit(toy_file, tmp_path / "profile", interval="profile", plots=False)
    _failing_minos(monkeypatch)
    result = run_fit(toy_file, tmp_path / "fit", plots=False)
    assert result.interval == "profile" and result.minos_failure is not None
    assert "no crossing found" in result.minos_failure
    assert "(MINOS)" not in result.summary() and "profile-likelihood interval, MINOS failed" in result.summary()
    # the interval is the profile likelihood's, not the Hesse error MINOS handed back
    assert result.error_up == pytest.approx(profile.error_up, rel=1e-3)
    assert result.error_down == pytest.approx(profile.error_down, rel=1e-3)
    doc = json.loads(result.results.read_text())
    assert doc["interval"]["method"] == "profile" and doc["interval"]["minos_failure"] == result.minos_failure

    res = CliRunner().invoke(main, ["fit", str(toy_file), "--output-dir", str(tmp_path / "cli"), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "(MINOS)" not in res.output and "note: MINOS failed" in res.output


def test_sparse_variations_are_capped_and_pruned(tmp_path: Path) -> None:
    """A variation doubling a bin is MC noise: capped at a 100 % effect; a sample of a few effective events
    keeps no variations at all; the fit converges on what is left."""
    path = tmp_path / "histograms.root"
    contents = toy_histograms()
    spike = contents["4j2b_single_top_tW_pt_res_up"].copy()
    spike[10] = 5 * contents["4j2b_single_top_tW"][10]
    sparse = {k: v * 1e-4 for k, v in contents.items() if k.startswith("4j1b_single_top_s_chan")}
    write_toy_histograms(path, extra={"4j2b_single_top_tW_pt_res_up": spike, **sparse})
    result = run_fit(path, tmp_path / "fit", plots=False)
    assert "4j2b_single_top_tW_pt_res_up" in result.capped
    assert result.pruned and all(k.startswith("4j1b_single_top_s_chan_") for k in result.pruned)
    assert result.minimum.converged
    with uproot.open(result.output_dir / "histograms_rebinned.root") as f:
        capped = f["4j2b_single_top_tW_pt_res_up"].values()
        nominal = f["4j2b_single_top_tW"].values()
    assert np.all(capped <= 2 * nominal + 1e-9) and np.all(capped >= 0)


def test_pseudodata_without_any_prediction_is_reported_not_fitted(tmp_path: Path) -> None:
    path = tmp_path / "histograms.root"
    contents = toy_histograms()
    emptied = {k: np.where(np.arange(HIST_BINS) >= 23, 0.0, v) for k, v in contents.items()
               if k.startswith("4j1b_") and not k.endswith("pseudodata")}
    write_toy_histograms(path, extra=emptied)
    with pytest.raises(FitError, match="4j1b bin 510-550 GeV has pseudodata but no simulated events"):
        run_fit(path, tmp_path / "fit", plots=False)
