"""``agc-sx fit``: the cabinetry fit of ``ttbar_norm``."""

from __future__ import annotations

from pathlib import Path

import click

from ..fit import INTERVALS, run_fit
from ._group import main, user_errors


@main.command("fit")
@click.argument("histograms", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("fit"),
              show_default=True, help="Folder for the configuration, workspace, fit results and plots.")
@click.option("--interval", type=click.Choice(INTERVALS), default="minos", show_default=True,
              help="How the ttbar_norm interval is found: MINOS, or the profile likelihood solved for "
                   "its crossings (both: where -2 ln L rises by 1).")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Draw the pull plot and the pre-/post-fit distributions.")
@user_errors()
def fit(histograms: Path, output_dir: Path, interval: str, plots: bool) -> None:
    """Fit the AGC model (cabinetry/pyhf) to the pseudodata in HISTOGRAMS and print ttbar_norm."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    result = run_fit(histograms, output_dir, interval=interval, plots=plots)
    for key in result.substituted:
        click.echo(f"note: {key} absent (zero sum); its nominal was used", err=True)
    click.echo(result.summary())
    click.echo(f"results: {result.results}")
    click.echo(f"config:  {result.config}")
    if result.plots:
        click.echo(f"plots:   {', '.join(p.name for p in result.plots)} in {result.output_dir}")
