"""``agc-sx plot``: stacked distributions, ttbar variations and the ML observables as PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ._group import main, user_errors


@main.command("plot")
@click.argument("histograms", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("plots"),
              show_default=True, help="Folder for the PNG files.")
@click.option("--ml", "ml_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ML histograms for the grid of BDT observables "
                   "[default: histograms_ml.root next to HISTOGRAMS, if present].")
@user_errors()
def plot(histograms: Path, output_dir: Path, ml_path: Path | None) -> None:
    """Draw HISTOGRAMS (from `agc-sx process`): stacks with pseudodata, ttbar variations, ML observables."""
    # the CMS style asks for fonts some systems lack; matplotlib's fallback is fine, its notice is noise
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    from ..plotting import plot_all

    plots = plot_all(histograms, output_dir, ml=ml_path)
    for p in plots:
        click.echo(f"wrote {p.path}")
