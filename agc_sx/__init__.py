"""agc-sx: the IRIS-HEP Analysis Grand Challenge CMS Open Data ttbar analysis, end to end on ServiceX."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__version__ = "0.1.0"


def _numba_cache_fallback() -> None:
    """Give numba a cache folder where it would find none, so that a read-only install still runs.

    The compiled kernels are cached (``cache=True``) beside the package or in the user's cache folder; where
    neither can be written (a system-wide install run by a service account without a home) numba refuses to
    define them at all. Only then, and only if the user has not chosen one, point it at a per-user folder in
    the system's temporary directory. Nothing changes for anybody else.
    """
    if "NUMBA_CACHE_DIR" in os.environ or os.access(Path(__file__).parent, os.W_OK):
        return
    probe = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    while not os.path.isdir(probe) and probe != probe.parent:  # the folder numba would create, or its parent
        probe = probe.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return
    folder = Path(tempfile.gettempdir()) / f"agc-sx-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:  # numba already imported: it read its environment then
        numba_config.CACHE_DIR = str(folder)  # type: ignore[attr-defined]


_numba_cache_fallback()
