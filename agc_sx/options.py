"""The choices the pipelines offer, one list each: the library checks against them and the CLI offers them.

Kept free of imports so that the command line can build its ``--help`` without loading coffea or the
ServiceX client.
"""

from __future__ import annotations

from typing import Final

#: coffea executors of ``agc-sx process`` (``--executor``).
EXECUTORS: Final = ("iterative", "futures", "dask")
#: Where the skim runs (``--backend``): on a ServiceX server, or here through the same func-adl-uproot code.
BACKENDS: Final = ("servicex", "local")
#: How catalogue paths are handed to a ServiceX server (``--dataset-type``).
DATASET_TYPES: Final = ("filelist", "rucio", "cernopendata")


def one_of(kind: str, value: str, choices: tuple[str, ...]) -> str | None:
    """None if ``value`` is one of ``choices``, else the one-line complaint, e.g. ``unknown executor 'x' (...)``."""
    if value in choices:
        return None
    return f"unknown {kind} {value!r} (choose from {', '.join(choices)})"
