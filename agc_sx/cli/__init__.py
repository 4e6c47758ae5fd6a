"""Command-line interface of agc-sx (``agc-sx --help``)."""

from __future__ import annotations

from . import catalog as _catalog  # noqa: F401  (registers commands)
from ._group import main

__all__ = ["main"]
