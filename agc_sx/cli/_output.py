"""What the commands print: their own lines, and the libraries' messages condensed into one (``--verbose``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..capture import Capture

F = TypeVar("F", bound=Callable[..., Any])


def verbose_option(func: F) -> F:
    """``-v/--verbose``, the same spelling on every command that captures third-party messages."""
    return click.option(
        "-v", "--verbose", is_flag=True,
        help="Show the libraries' messages (Minuit, pyhf, cabinetry, matplotlib, xgboost) as they come, "
             "instead of collecting them in a log file.",
    )(func)


def echo_captured(capture: Capture, relative_to: Path | None = None) -> None:
    """The one line for what a stage's libraries said, e.g. ``12 Minuit warnings, see fit/fit.log``."""
    line = capture.summary(relative_to if relative_to is not None else Path.cwd())
    if line:
        click.echo(line)


__all__ = ["echo_captured", "verbose_option"]
