"""``agc-sx demo``: the whole offline chain in one command, ending in the fitted ttbar_norm."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

from agc_sx.cli import main


def test_demo_runs_the_chain_and_prints_the_fit(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path), "--events", "6000", "--quiet"])
    assert result.exit_code == 0, result.output
    out = result.output
    for i, stage in enumerate(("generate", "deliver", "process", "plot", "fit"), start=1):
        assert f"[{i}/5] {stage}:" in out
    match = re.search(r"ttbar_norm = (\d+\.\d+) (?:± (\d+\.\d+)|\+(\d+\.\d+) -(\d+\.\d+)) \((MINOS)\)", out)
    assert match, out
    assert 0.2 < float(match.group(1)) < 3.0

    assert "54,000 generated" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert f"{metrics['events_read']:,} processed" in out
    for region, n in metrics["events_per_region"].items():
        assert f"{n:,} in {region}" in out
    for path in ("histograms.root", "histograms_ml.root", "plots/4j1b_stack.png", "plots/ml_observables.png",
                 "fit/fit_results.json", "fit/cabinetry_config.yml", "outputs_databinder/manifest.json"):
        assert (tmp_path / path).is_file(), path
    fit = json.loads((tmp_path / "fit" / "fit_results.json").read_text())
    assert fit["summary"] in out
    assert abs(fit["bestfit"] - float(match.group(1))) < 5e-4
