"""Delivery backends: the skim of every catalogue sample into ``DIR/<process>__<variation>/*.parquet``.

:mod:`.common` holds what all backends share (plan, verified storage, manifest, report); :mod:`.local` runs
the query here, ``servicex_backend`` on a ServiceX server.
"""

from __future__ import annotations

from .common import DeliveryError, DeliveryReport
from .local import deliver_local

__all__ = ["DeliveryError", "DeliveryReport", "deliver_local"]
