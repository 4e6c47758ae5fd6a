"""The ``agc-sx`` command group. Commands live in one module per stage and only parse arguments."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .. import __version__
from ..errors import AgcSxError, Interrupted
from ..options import BACKENDS

if TYPE_CHECKING:
    from ..catalogue import Catalog

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="agc-sx")
def main() -> None:
    """agc-sx: the IRIS-HEP AGC CMS Open Data ttbar analysis, from ServiceX delivery to the fit.

    \b
    Typical chain:
      agc-sx deliver                       # skim on ServiceX (or --backend local) into outputs_databinder/
      agc-sx process outputs_databinder/   # coffea: regions, systematics, BDT -> histograms.root
      agc-sx plot histograms.root          # stacked plots, variations, ML observables
      agc-sx fit histograms.root           # cabinetry fit of ttbar_norm
    Or everything offline on generated events: agc-sx demo
    """


#: Worker processes when ``--workers`` is not given: every core, as the AGC notebook's FuturesExecutor(NUM_CORES).
ALL_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def workers_option(what: str) -> Callable[[F], F]:
    """``--workers N``, the same spelling and default (all cores) on every command."""
    return click.option("--workers", type=click.IntRange(min=1), default=ALL_CORES,
                        help=f"{what} [default: all cores, {ALL_CORES} here]; --workers 1 runs in one process.")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line to stderr and exit non-zero."""
    click.echo(f"agc-sx: error: {message}", err=True)
    sys.exit(code)


def _exit_now(code: int) -> NoReturn:
    """Exit at once after Ctrl-C, once everything is recorded: the servicex client leaves worker threads
    behind that the interpreter would otherwise wait for (seconds under load). Inside a test runner, whose
    streams replace the process's own, it is a normal exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        os._exit(code)
    sys.exit(code)


def user_errors(*extra: type[BaseException]) -> Callable[[F], F]:
    """Turn :class:`~agc_sx.errors.AgcSxError` (and the ``extra`` types) into one ``agc-sx: error: ...`` line
    and exit code 1; anything else is a bug and keeps its traceback.
    """
    kinds: tuple[type[BaseException], ...] = (AgcSxError, *extra)

    def deco(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Interrupted as err:
                click.echo(f"agc-sx: error: {err}", err=True)
                _exit_now(130)
            except KeyboardInterrupt:
                fail("interrupted", code=130)
            except kinds as err:
                fail(str(err))
            except OSError as err:
                if err.filename is None:  # not about a file or folder: a bug, keep its traceback
                    raise
                # a folder that cannot be created, read or written (permissions, read-only, full disk, a file
                # where a folder should be): the path and the system's reason, on one line
                where = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
                fail(f"{where}: {err.strerror or type(err).__name__}")

        return wrapper  # type: ignore[return-value]

    return deco


def catalog_options(func: F) -> F:
    """``--catalog``, ``--n-files`` and ``--samples``: which inputs of which catalogue a command works on."""
    for option in reversed((
        click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Sample catalogue [default: the bundled ntuples.json]."),
        click.option("--n-files", type=click.IntRange(min=1), default=None,
                     help="Only the first N files of each sample (normalisation follows)."),
        click.option("--samples", "samples", metavar="S1,S2", default=None,
                     help="Comma-separated samples: process__variation or a bare process [default: all]."),
    )):
        func = option(func)
    return func


def prefix_options(func: F) -> F:
    """``--prefix-from A --prefix-to B``: read the catalogue's files through another door (EOS, an XCache, a
    redirector) without rewriting it; the same spelling as ``agc-sx catalog import``.
    """
    for option in reversed((
        click.option("--prefix-from", metavar="A", default=None,
                     help="Read catalogue paths starting with A ..."),
        click.option("--prefix-to", metavar="B", default=None,
                     help="... from paths starting with B instead (e.g. root://eospublic.cern.ch//eos/...)."),
    )):
        func = option(func)
    return func


def select_catalog(catalog_path: Path | None, n_files: int | None, samples: str | None,
                   prefix_from: str | None = None, prefix_to: str | None = None) -> Catalog:
    """The catalogue restricted as :func:`catalog_options` asked, paths rewritten as :func:`prefix_options` asked."""
    from ..catalogue import load_catalog, rewrite_prefix

    names = [n.strip() for n in samples.split(",") if n.strip()] if samples else None
    return rewrite_prefix(load_catalog(catalog_path).select(names, n_files), prefix_from, prefix_to)


def servicex_options(func: F) -> F:
    """How to reach the ServiceX server: ``--servicex-config``, ``--endpoint``, ``--ignore-cache``."""
    for option in reversed((
        click.option("--servicex-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="ServiceX: servicex.yaml to use instead of the client's usual search."),
        click.option("--endpoint", metavar="NAME", default=None,
                     help="ServiceX: endpoint name from the configuration [default: its default endpoint]."),
        click.option("--ignore-cache", is_flag=True, help="ServiceX: do not reuse the client's cached transforms."),
    )):
        func = option(func)
    return func


def delivery_options(func: F) -> F:
    """``--backend`` and ``--output-dir``: where the skim runs and where its outputs and manifest go."""
    for option in reversed((
        click.option("--backend", type=click.Choice(BACKENDS), default="servicex", show_default=True,
                     help="Run the skim on a ServiceX server, or here through the same func-adl-uproot code path."),
        click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=Path("outputs_databinder"), show_default=True,
                     help="Delivery folder: DIR/<process>__<variation>/*.parquet and DIR/manifest.json."),
    )):
        func = option(func)
    return func
