"""``agc-sx plot``: stacked distributions, ttbar variations and the ML observables as PNG."""

from __future__ import annotations

from pathlib import Path

import click

from ..capture import captured
from ._group import main, user_errors
from ._output import echo_captured, verbose_option

#: Where the plot stage keeps what matplotlib says (font fallbacks of the CMS style, ...), in its folder.
PLOT_LOG = "plot.log"


@main.command("plot")
@click.argument("histograms", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("plots"),
              show_default=True, help="Folder for the PNG files.")
@click.option("--ml", "ml_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ML histograms for the grid of BDT observables "
                   "[default: histograms_ml.root next to HISTOGRAMS, if present].")
@verbose_option
@user_errors()
def plot(histograms: Path, output_dir: Path, ml_path: Path | None, verbose: bool) -> None:
    """Draw HISTOGRAMS (from `agc-sx process`): stacks with pseudodata, ttbar variations, ML observables."""
    from ..plotting import plot_all

    with captured(output_dir / PLOT_LOG, verbose=verbose) as capture:
        plots = plot_all(histograms, output_dir, ml=ml_path)
    for p in plots:
        click.echo(f"wrote {p.path}")
    echo_captured(capture)
