"""``agc-sx demo``: the whole chain offline on generated events."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..demo import DEFAULT_EVENTS, DEFAULT_SEED, MIN_EVENTS, DemoSummary, run_demo
from ._group import main, user_errors
from ._output import verbose_option
from .fit import fit_notes


@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("agc-demo"),
              show_default=True, help="Folder for everything the demo writes.")
@click.option("--events", type=int, default=DEFAULT_EVENTS, show_default=True,
              help=f"Generated events per sample (9 samples), at least {MIN_EVENTS:,}: with fewer the "
                   "templates are too sparse for the fit to converge on every seed.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of the event generator.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes for delivery and processing.")
@click.option("--quiet", is_flag=True, help="No progress bars (the stage lines and the summary stay).")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Draw the distributions and the fit's plots (the plot stage).")
@verbose_option
@user_errors()
def demo(workdir: Path, events: int, seed: int, workers: int, quiet: bool, plots: bool, verbose: bool) -> None:
    """Generate a small sample set, deliver it locally, process (with the BDT), plot and fit: no server needed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    summary = run_demo(workdir, events=events, seed=seed, workers=workers, quiet=quiet, verbose=verbose,
                       plots=plots, announce=click.echo)
    _print_summary(summary)


def _print_summary(s: DemoSummary) -> None:
    console = Console(width=110)
    console.print()
    console.print(f"[bold]events[/bold]: {s.events_generated:,} generated -> {s.events_delivered:,} delivered "
                  f"by the skim -> {s.events_processed:,} processed; "
                  + ", ".join(f"{n:,} in {r}" for r, n in s.region_events.items()))
    table = Table(title="nominal yields (events at 3.378 /fb)")
    table.add_column("process")
    for region in s.region_yields:
        table.add_column(region, justify="right")
    processes = next(iter(s.region_yields.values())).keys() if s.region_yields else []
    for process in processes:
        table.add_row(process, *(f"{s.region_yields[r][process]:,.1f}" for r in s.region_yields))
    console.print(table)
    timing = Table(title="time per stage")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for name, seconds in s.stage_seconds.items():
        timing.add_row(name, f"{seconds:.1f}")
    timing.add_row("total", f"{sum(s.stage_seconds.values()):.1f}")
    console.print(timing)
    for what, path in s.files.items():
        console.print(f"{what:>14}: {path}")
    if s.fit is not None:
        console.print(f"\n[bold]{s.fit.summary()}[/bold]", highlight=False)
        for note in fit_notes(s.fit):
            console.print(f"note: {note}", highlight=False, soft_wrap=True)
