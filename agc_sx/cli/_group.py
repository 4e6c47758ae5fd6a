"""The ``agc-sx`` command group. Commands live in one module per stage and only parse arguments."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from .. import __version__

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


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line to stderr and exit non-zero."""
    click.echo(f"agc-sx: error: {message}", err=True)
    sys.exit(code)


def user_errors(*kinds: type[BaseException]) -> Callable[[F], F]:
    """Turn the listed exception types into one ``agc-sx: error: ...`` line and exit code 1."""

    def deco(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except kinds as err:
                fail(str(err))

        return wrapper  # type: ignore[return-value]

    return deco
