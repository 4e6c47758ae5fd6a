"""``agc-sx process``: run the coffea processor on a delivery folder and write histograms.root."""

from __future__ import annotations

from pathlib import Path

import click

from ._group import main, user_errors

_EXECUTORS = ("iterative", "futures", "dask")


def _errors() -> tuple[type[BaseException], ...]:
    from ..manifest import ManifestError
    from ..processor import ProcessError
    from ..schema import SchemaError

    return ManifestError, ProcessError, SchemaError


@main.command("process")
@click.argument("input_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("histograms.root"),
              show_default=True,
              help="Histograms file to write; histograms_ml.root and metrics.json go beside it.")
@click.option("--executor", type=click.Choice(_EXECUTORS), default="iterative", show_default=True,
              help="coffea executor: in this process, a process pool, or Dask.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (futures, local Dask cluster); xgboost threads with iterative.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Connect --executor dask to this Dask scheduler (e.g. tcp://host:8786) instead of a local one.")
@click.option("--chunksize", type=click.IntRange(min=1), default=None,
              help="Events per chunk [default: one chunk per file]. Results do not depend on it.")
@click.option("--allow-incomplete", is_flag=True,
              help="Process samples whose delivery is incomplete (normalised to the delivered inputs).")
@click.option("--no-ml", "no_ml", is_flag=True, help="Skip the BDT reconstruction and histograms_ml.root.")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with model_even.json and model_odd.json [default: the bundled models].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, only the summary line.")
def process(input_dir: Path, output: Path, executor: str, workers: int, scheduler: str | None,
            chunksize: int | None, allow_incomplete: bool, no_ml: bool, models_dir: Path | None,
            quiet: bool) -> None:
    """Process the delivered skim in DIR into AGC histograms (regions, systematics, BDT observables)."""
    from ..processor import run_processor

    @user_errors(*_errors())
    def run() -> None:
        result = run_processor(input_dir, output=output, executor=executor, workers=workers,
                               scheduler=scheduler, chunksize=chunksize, allow_incomplete=allow_incomplete,
                               ml=not no_ml, models_dir=models_dir, quiet=quiet)
        m = result.metrics
        rate = m["event_rate_hz"] or 0.0
        extra = f" + {len(result.ml_histograms)} in {result.ml_output}" if result.ml_output else ""
        click.echo(f"wrote {result.output}: {len(result.histograms)} histograms{extra}; "
                   f"{m['events_read']:,} events in {m['wall_seconds']:.1f} s ({rate:,.0f} events/s)")

    run()
