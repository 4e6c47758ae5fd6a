"""``agc-sx demo``: the whole offline chain in one command, ending in the fitted ttbar_norm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from agc_sx.cli import main
from agc_sx.demo import MIN_EVENTS, run_demo

#: The interval line, with the method that produced it: MINOS, or the profile likelihood when MINOS failed.
SUMMARY = re.compile(r"ttbar_norm = (\d+\.\d+) (?:± (\d+\.\d+)|\+(\d+\.\d+) -(\d+\.\d+)) "
                     r"\((MINOS|profile-likelihood interval, MINOS failed)\)")


def test_demo_runs_the_chain_and_prints_the_fit(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--events", "6000"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert len(out.splitlines()) < 150, out  # progress bars included; the libraries' chatter is in the logs
    for i, stage in enumerate(("generate", "deliver", "process", "plot", "fit"), start=1):
        assert f"[{i}/5] {stage}:" in out
    assert "FCN result is NaN" not in out and "has empty bins" not in out and "findfont" not in out
    match = SUMMARY.search(out)
    assert match, out
    assert 0.2 < float(match.group(1)) < 3.0

    assert "54,000 generated" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert f"{metrics['events_read']:,} processed" in out
    for region, n in metrics["events_per_region"].items():
        assert f"{n:,} in {region}" in out
    for path in ("histograms.root", "histograms_ml.root", "plots/4j1b_stack.png", "plots/ml_observables.png",
                 "fit/fit_results.json", "fit/cabinetry_config.yml", "fit/fit.log", "outputs_databinder/manifest.json"):
        assert (tmp_path / path).is_file(), path
    fit = json.loads((tmp_path / "fit" / "fit_results.json").read_text())
    assert fit["summary"] in out
    assert fit["minimisation"]["converged"] is True
    assert abs(fit["bestfit"] - float(match.group(1))) < 5e-4


def test_too_few_events_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "d"), "--events", str(MIN_EVENTS - 1)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [f"agc-sx: error: --events must be at least {MIN_EVENTS:,}, "
                                               f"got {MIN_EVENTS - 1:,}"]
    assert not (tmp_path / "d").exists()
    help_text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert f"at least {MIN_EVENTS:,}" in " ".join(help_text.split())


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 11))
def test_demo_fit_converges_with_a_labelled_interval(seed: int, tmp_path: Path) -> None:
    """Every seed at the smallest demo allowed: Migrad converges and the interval says which method produced it."""
    summary = run_demo(tmp_path, events=MIN_EVENTS, seed=seed, workers=1, quiet=True, plots=False,
                       announce=lambda _: None)
    fit = summary.fit
    assert fit.minimum.converged
    assert SUMMARY.fullmatch(fit.summary()), fit.summary()
    assert (fit.interval == "minos") == (fit.minos_failure is None)
    assert 0.005 < fit.error_down < 1.0 and 0.005 < fit.error_up < 1.0
    assert abs(fit.error_up - fit.hesse_error) > 1e-6 or fit.interval == "minos"
