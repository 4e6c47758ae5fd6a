"""Command-line interface of agc-sx (``agc-sx --help``)."""

from __future__ import annotations

from . import catalog as _catalog  # noqa: F401  (registers commands)
from . import deliver as _deliver  # noqa: F401
from . import demo as _demo  # noqa: F401
from . import fit as _fit  # noqa: F401
from . import generate as _generate  # noqa: F401
from . import plot as _plot  # noqa: F401
from . import process as _process  # noqa: F401
from . import run as _run  # noqa: F401
from . import train as _train  # noqa: F401
from ._group import main

__all__ = ["main"]
