"""``agc-sx catalog import`` and ``agc-sx samples``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..catalogue import import_agc_catalog, load_catalog, save_catalog
from ..constants import LUMI_PB
from ._group import main, user_errors


@main.group("catalog")
def catalog_group() -> None:
    """Manage sample catalogues (ntuples.json)."""


@catalog_group.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("ntuples.json"),
              show_default=True, help="Where to write the converted catalogue.")
@click.option("--prefix-from", metavar="A", help="Rewrite file paths starting with A ...")
@click.option("--prefix-to", metavar="B", help="... so that they start with B instead (e.g. a root:// mirror).")
@user_errors()
def catalog_import(path: Path, output: Path, prefix_from: str | None, prefix_to: str | None) -> None:
    """Convert an AGC-format catalogue (nanoaod_inputs.json) into ours, adding cross sections."""
    catalog = import_agc_catalog(path, prefix_from, prefix_to)
    save_catalog(catalog, output)
    click.echo(f"wrote {output}: {len(catalog)} samples, {catalog.n_files} files, {catalog.nevts:,} events")


@main.command("samples")
@click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Sample catalogue [default: the bundled ntuples.json].")
@click.option("--n-files", type=click.IntRange(min=1), default=None,
              help="Only the first N files of each sample (normalisation follows).")
@user_errors()
def samples(catalog_path: Path | None, n_files: int | None) -> None:
    """Show the samples of a catalogue: files, events, cross section and weight per event."""
    catalog = load_catalog(catalog_path).select(n_files=n_files)
    table = Table(title=f"{catalog.source}", caption=f"weights at L = {LUMI_PB:g} /pb")
    for col in ("process", "variation", "files", "events", "xsec [pb]", "weight / event"):
        table.add_column(col, justify="left" if col in ("process", "variation") else "right")
    for s in catalog:
        table.add_row(s.process, s.variation, str(len(s.files)), f"{s.nevts_total:,}", f"{s.xsec:.6g}",
                      f"{s.weight:.4g}")
    table.add_section()
    table.add_row("total", f"{len(catalog)} samples", str(catalog.n_files), f"{catalog.nevts:,}", "", "")
    Console(width=120).print(table)
