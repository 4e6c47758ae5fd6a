"""``agc-sx generate``: toy NanoAOD inputs for the offline demo, the tests and the BDT training."""

from __future__ import annotations

from pathlib import Path

import click

from ..generate import DEFAULT_EVENTS_PER_FILE, DEFAULT_FILES_PER_SAMPLE, generate
from ._group import main, user_errors


@main.command("generate")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--events-per-file", type=click.IntRange(min=1), default=DEFAULT_EVENTS_PER_FILE,
              show_default=True, help="Events in each generated ROOT file.")
@click.option("--files-per-sample", type=click.IntRange(min=1), default=DEFAULT_FILES_PER_SAMPLE,
              show_default=True, help="Files written for each (process, variation) sample.")
@click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True,
              help="Random seed; the same seed gives identical events.")
@click.option("--samples", "samples", multiple=True, metavar="NAME",
              help="Only these samples (e.g. ttbar__nominal) or processes (e.g. wjets); repeatable. "
                   "[default: all 9 samples of the catalogue]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@user_errors(ValueError, OSError)
def generate_cmd(outdir: Path, events_per_file: int, files_per_sample: int, seed: int,
                 samples: tuple[str, ...], progress: bool) -> None:
    """Generate toy CMS NanoAOD files (TTree Events) for every sample, plus OUTDIR/ntuples.json.

    The files have the branch names and types of the 2015 AGC NanoAOD (ttbar and its variations, single top,
    W+jets); use the catalogue with the other commands, e.g. --catalog OUTDIR/ntuples.json.
    """
    catalog = generate(outdir, events_per_file=events_per_file, files_per_sample=files_per_sample, seed=seed,
                       samples=list(samples) or None, progress=progress)
    click.echo(f"wrote {catalog.n_files} files, {catalog.nevts:,} events, catalogue {catalog.source}")
