"""``agc-sx deliver``: skim the catalogue's samples into ``outputs_databinder/`` (ServiceX or local)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..delivery.common import DeliveryReport
from ..options import DATASET_TYPES
from ._group import (
    catalog_options,
    delivery_options,
    fail,
    main,
    prefix_options,
    select_catalog,
    servicex_options,
    user_errors,
    workers_option,
)

#: Options that only mean something to the ServiceX backend: (parameter name, flag, default).
_SERVICEX_ONLY = (
    ("servicex_config", "--servicex-config", None),
    ("endpoint", "--endpoint", None),
    ("ignore_cache", "--ignore-cache", False),
    ("dataset_type", "--dataset-type", "filelist"),
    ("config", "--config", None),
)


@main.command("deliver")
@delivery_options
@catalog_options
@prefix_options
@workers_option("Local backend: files skimmed in parallel (worker processes)")
@click.option("--force", is_flag=True, help="Redo every output, even those already delivered with this query.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--show-query", is_flag=True, help="Print the qastle text that would be sent, and exit.")
@servicex_options
@click.option("--dataset-type", type=click.Choice(DATASET_TYPES), default="filelist",
              show_default=True, help="ServiceX: how catalogue paths are handed to the server.")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ServiceX: a servicex-databinder style YAML (General/Sample) instead of the catalogue.")
@user_errors()
def deliver(
    backend: str,
    catalog_path: Path | None,
    n_files: int | None,
    samples: str | None,
    prefix_from: str | None,
    prefix_to: str | None,
    output_dir: Path,
    workers: int,
    force: bool,
    quiet: bool,
    show_query: bool,
    **servicex_options: Any,
) -> None:
    """Skim the samples (one lepton, >= 4 jets, >= 1 b-tag; pruned columns) into one parquet per input file.

    Re-running skips outputs already delivered with the same query and redoes missing or damaged ones. Exits
    non-zero, with one line per failed input, when any sample is incomplete.
    """
    if show_query:
        from ..query import query_text

        click.echo(query_text())
        return
    if backend == "local":
        given = [flag for name, flag, default in _SERVICEX_ONLY if servicex_options[name] != default]
        if given:
            fail(f"{', '.join(given)}: only for --backend servicex")
    elif click.get_current_context().get_parameter_source("workers") != ParameterSource.DEFAULT:
        fail("--workers only applies to --backend local (ServiceX runs the files in parallel on the server)")

    config: Path | None = servicex_options.pop("config")
    if config is not None:
        if catalog_path is not None or n_files is not None or samples is not None:
            fail("--config describes its own samples; do not combine it with --catalog, --n-files or --samples")
        if prefix_from is not None or prefix_to is not None:
            fail("--prefix-from/--prefix-to rewrite catalogue paths; --config gives its own datasets")
        if servicex_options["dataset_type"] != "filelist":
            fail("--config gives each sample's dataset (XRootDFiles or RucioDID); do not combine it with --dataset-type")
        # what the command line says explicitly wins over the YAML's General section
        explicit_dir = click.get_current_context().get_parameter_source("output_dir") != ParameterSource.DEFAULT
        backend_module = _servicex_backend()
        report = backend_module.deliver_from_config(
            config, servicex_config=servicex_options["servicex_config"], force=force, quiet=quiet,
            output_dir=output_dir if explicit_dir else None, endpoint=servicex_options["endpoint"],
            ignore_cache=servicex_options["ignore_cache"],
        )
        _finish(report)
        return

    from ..delivery import deliver as deliver_catalog

    catalog = select_catalog(catalog_path, n_files, samples, prefix_from, prefix_to)
    _finish(deliver_catalog(catalog, output_dir, backend=backend, workers=workers, force=force, quiet=quiet,
                            servicex=servicex_options))


def _servicex_backend() -> Any:
    """Import the ServiceX backend lazily: the local backend must work without touching the client."""
    try:
        from ..delivery import servicex_backend
    except ImportError as err:
        fail(f"the ServiceX backend is not available ({err}); use --backend local")
    return servicex_backend


def _finish(report: DeliveryReport) -> None:
    """Summary line when everything is delivered; otherwise one line per failed input and exit code 1."""
    failures = list(report.failures)
    summary = report.summary()
    if report.ok:
        click.echo(summary or "delivery complete")
        return
    for line in failures or ["delivery incomplete"]:
        click.echo(f"agc-sx: failed: {line}", err=True)
    if summary:
        click.echo(summary, err=True)
    raise SystemExit(1)
