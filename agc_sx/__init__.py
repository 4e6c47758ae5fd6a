"""agc-sx: the IRIS-HEP Analysis Grand Challenge CMS Open Data ttbar analysis, end to end on ServiceX."""

from __future__ import annotations

__version__ = "0.1.0"
