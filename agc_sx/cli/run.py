"""``agc-sx run``: the streaming pipeline (deliver and process at once)."""

from __future__ import annotations

from pathlib import Path

import click

from ._group import (
    catalog_options,
    delivery_options,
    main,
    prefix_options,
    select_catalog,
    servicex_options,
    user_errors,
    workers_option,
)


@main.command("run")
@delivery_options
@catalog_options
@prefix_options
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("histograms.root"),
              show_default=True, help="Histograms file; histograms_ml.root and metrics.json are written beside it.")
@workers_option("Processor worker processes (and local delivery workers)")
@click.option("--no-ml", is_flag=True, help="Skip the BDT jet-parton assignment (no histograms_ml.root).")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with model_even.json and model_odd.json [default: the bundled models].")
@click.option("--force", is_flag=True, help="Redo the delivery and the processing from scratch (ignore the checkpoint).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@servicex_options
@user_errors()
def run(backend: str, catalog_path: Path | None, n_files: int | None, samples: str | None,
        prefix_from: str | None, prefix_to: str | None, output_dir: Path, output: Path, workers: int, no_ml: bool,
        models_dir: Path | None, force: bool, quiet: bool,
        servicex_config: Path | None, endpoint: str | None, ignore_cache: bool) -> None:
    """Deliver and process at once: every file is processed as soon as it has landed and been verified.

    The result equals `agc-sx deliver` followed by `agc-sx process`. Progress is checkpointed after every file
    (OUTPUT-DIR/.agc-sx-stream.json, plain data tied to this run), so an interrupted run resumes without
    processing any file twice.
    """
    if backend == "local" and (servicex_config or endpoint or ignore_cache):
        raise click.UsageError("--servicex-config, --endpoint and --ignore-cache are only for --backend servicex")
    from ..streaming import run_streaming

    catalog = select_catalog(catalog_path, n_files, samples, prefix_from, prefix_to)
    servicex = {"servicex_config": servicex_config, "endpoint": endpoint, "ignore_cache": ignore_cache}
    result = run_streaming(catalog, output_dir, backend=backend, output=output, workers=workers, ml=not no_ml,
                           models_dir=models_dir, force=force, quiet=quiet,
                           servicex=servicex if backend == "servicex" else None)
    m = result.metrics
    overlap = m.get("overlap_fraction")
    click.echo(
        f"wrote {result.output}: {len(result.histograms)} histograms; {m['events_read']:,} events from "
        f"{m['files_accumulated']} files in {m['wall_seconds']:.1f} s"
        + (f"; {overlap:.0%} of the processing overlapped the delivery" if overlap is not None else "")
    )
