"""``agc-sx fit``: the cabinetry fit of ``ttbar_norm``."""

from __future__ import annotations

from pathlib import Path

import click

from ..capture import captured
from ..fit import INTERVALS, FitResult, run_fit
from ._group import main, user_errors
from ._output import echo_captured, verbose_option

#: Where the fit keeps what Minuit, pyhf and cabinetry say, in its output folder.
FIT_LOG = "fit.log"


@main.command("fit")
@click.argument("histograms", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("fit"),
              show_default=True, help="Folder for the configuration, workspace, fit results and plots.")
@click.option("--interval", type=click.Choice(INTERVALS), default="minos", show_default=True,
              help="How the ttbar_norm interval is found: MINOS (the profile likelihood if MINOS fails), or "
                   "the profile likelihood solved for its crossings (both: where -2 ln L rises by 1).")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Draw the pull plot and the pre-/post-fit distributions.")
@verbose_option
@user_errors()
def fit(histograms: Path, output_dir: Path, interval: str, plots: bool, verbose: bool) -> None:
    """Fit the AGC model (cabinetry/pyhf) to the pseudodata in HISTOGRAMS and print ttbar_norm."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    with captured(output_dir / FIT_LOG, verbose=verbose) as capture:
        result = run_fit(histograms, output_dir, interval=interval, plots=plots)
    click.echo(result.summary())
    for line in fit_notes(result):
        click.echo(f"note: {line}")
    click.echo(f"results: {result.results}")
    click.echo(f"config:  {result.config}")
    if result.plots:
        click.echo(f"plots:   {', '.join(p.name for p in result.plots)} in {result.output_dir}")
    echo_captured(capture)


def fit_notes(result: FitResult) -> list[str]:
    """What a reader of the result should know besides the interval, one line each (none for a clean fit)."""
    notes = []
    if result.minos_failure is not None:
        notes.append(f"MINOS failed ({result.minos_failure}); the interval is the profile likelihood's")
    if not result.minimum.covariance_accurate:
        notes.append("the covariance matrix is not accurate: the Hesse errors in fit_results.json are rough")
    if result.minimum.at_limit:
        notes.append("parameters at a bound: " + ", ".join(result.minimum.at_limit))
    modified = [(len(result.substituted), "absent or empty"), (len(result.pruned), "pruned (too few events)"),
                (len(result.capped), "capped at a 100 % effect per bin")]
    if any(n for n, _ in modified):
        notes.append("variation templates " + ", ".join(f"{n} {what}" for n, what in modified if n)
                     + " (listed in fit_results.json)")
    return notes
