"""``agc-sx process``: run the coffea processor on a delivery folder (or directly on a catalogue's NanoAOD)."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import EXECUTORS
from ._group import fail, main, prefix_options, select_catalog, user_errors, workers_option


@main.command("process")
@click.argument("input_dir", metavar="[DIR]", required=False, default=None, type=click.Path(path_type=Path))
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Process this catalogue's NanoAOD ROOT files directly (skim applied in the processor) "
                   "instead of a delivery folder DIR.")
@click.option("--n-files", type=click.IntRange(min=1), default=None,
              help="With --catalog: only the first N files of each sample (normalisation follows).")
@click.option("--samples", "samples", metavar="S1,S2", default=None,
              help="With --catalog: comma-separated samples, process__variation or a bare process [default: all].")
@prefix_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("histograms.root"),
              show_default=True,
              help="Histograms file to write; histograms_ml.root and metrics.json go beside it.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="futures", show_default=True,
              help="coffea executor: in this process, a process pool (one process with --workers 1), or Dask.")
@workers_option("Worker processes (futures, local Dask cluster); xgboost threads with iterative")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Connect --executor dask to this Dask scheduler (e.g. tcp://host:8786) instead of a local one.")
@click.option("--chunksize", type=click.IntRange(min=1), default=None,
              help="Events per chunk [default: one chunk per parquet file; 100000 for ROOT input, which keeps a worker within 1 GB]. "
                   "Results do not depend on it.")
@click.option("--allow-incomplete", is_flag=True,
              help="Process samples whose delivery is incomplete (normalised to the delivered inputs).")
@click.option("--no-ml", "no_ml", is_flag=True, help="Skip the BDT reconstruction and histograms_ml.root.")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with model_even.json and model_odd.json [default: the bundled models].")
@click.option("--io-only", is_flag=True,
              help="Benchmark mode: read exactly the needed columns and nothing else; writes only metrics.json.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, only the summary line.")
def process(input_dir: Path | None, catalog_path: Path | None, n_files: int | None, samples: str | None,
            prefix_from: str | None, prefix_to: str | None, output: Path, executor: str, workers: int,
            scheduler: str | None, chunksize: int | None,
            allow_incomplete: bool, no_ml: bool, models_dir: Path | None, io_only: bool, quiet: bool) -> None:
    """Process the delivered skim in DIR (or, with --catalog, the NanoAOD files directly) into AGC histograms
    (regions, systematics, BDT observables).
    """
    from ..processor import run_direct, run_processor

    if input_dir is not None and catalog_path is not None:
        fail("give either DIR (a delivery folder) or --catalog (direct NanoAOD processing), not both")
    if input_dir is None and catalog_path is None:
        fail("give DIR (a delivery folder) or --catalog CATALOG (direct NanoAOD processing)")
    if input_dir is not None and (n_files is not None or samples is not None):
        fail("--n-files and --samples select catalogue inputs: use them with --catalog (DIR is processed whole)")
    if input_dir is not None and (prefix_from is not None or prefix_to is not None):
        fail("--prefix-from/--prefix-to rewrite catalogue paths: use them with --catalog")
    if catalog_path is not None and allow_incomplete:
        fail("--allow-incomplete applies to a delivery folder DIR, not to --catalog")

    @user_errors()
    def run() -> None:
        common = dict(output=output, executor=executor, workers=workers, scheduler=scheduler, chunksize=chunksize,
                      ml=not no_ml, models_dir=models_dir, quiet=quiet, io_only=io_only)
        if catalog_path is not None:
            catalog = select_catalog(catalog_path, n_files, samples, prefix_from, prefix_to)
            result = run_direct(catalog, **common)  # type: ignore[arg-type]
        else:
            assert input_dir is not None
            result = run_processor(input_dir, allow_incomplete=allow_incomplete, **common)  # type: ignore[arg-type]
        m = result.metrics
        rate = m["event_rate_hz"] or 0.0
        summary = f"{m['events_read']:,} events in {m['wall_seconds']:.1f} s ({rate:,.0f} events/s)"
        if io_only:
            click.echo(f"read {len(m['columns_read'])} columns, {m['bytes_read'] / 1e6:,.1f} MB: {summary}; "
                       f"wrote {result.metrics_path}")
            return
        extra = f" + {len(result.ml_histograms)} in {result.ml_output}" if result.ml_output else ""
        click.echo(f"wrote {result.output}: {len(result.histograms)} histograms{extra}; {summary}")
        partial = m.get("incomplete_samples") or {}
        if partial:
            click.echo(f"agc-sx: warning: --allow-incomplete: {len(partial)} sample(s) processed from a partial "
                       f"delivery ({', '.join(f'{k}: {v}' for k, v in sorted(partial.items()))}); "
                       "their normalisation covers only the delivered files", err=True)

    run()
