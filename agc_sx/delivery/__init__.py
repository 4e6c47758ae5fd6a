"""Delivery backends: the skim of every catalogue sample into ``DIR/<process>__<variation>/*.parquet``.

:mod:`.common` holds what all backends share (plan, verified storage, manifest, report, :class:`Job`);
:mod:`.local` runs the query here, :mod:`.servicex_backend` on a ServiceX server. :func:`deliver` is the one
entry point ``agc-sx deliver`` and the streaming pipeline go through.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..catalogue import Catalog
from ..errors import DeliveryError
from ..options import BACKENDS, one_of
from .common import DeliveryReport
from .local import deliver_local


def deliver(catalog: Catalog, output_dir: Path, *, backend: str = "servicex", workers: int | None = None,
            force: bool = False, quiet: bool = False, servicex: Mapping[str, Any] | None = None) -> DeliveryReport:
    """Deliver every sample of ``catalog`` into ``output_dir`` with the backend named ``backend``.

    Args:
        catalog: the samples and their input files.
        output_dir: the delivery folder (``manifest.json`` and one subfolder per sample).
        backend: one of :data:`agc_sx.options.BACKENDS`.
        workers: local backend: files skimmed in parallel; default one per core.
        force: redo every output, even those already delivered with this query.
        quiet: no progress bars.
        servicex: keyword options of :func:`.servicex_backend.deliver_servicex` (endpoint, dataset type ...).
    """
    if (problem := one_of("backend", backend, BACKENDS)) is not None:
        raise DeliveryError(problem)
    if backend == "local":
        return deliver_local(catalog, output_dir, workers=workers, force=force, quiet=quiet)
    try:  # imported here: the local backend must work without the ServiceX client
        from .servicex_backend import deliver_servicex
    except ImportError as err:
        raise DeliveryError(f"the ServiceX backend is not available ({err}); use --backend local") from None
    return deliver_servicex(catalog, output_dir, force=force, quiet=quiet, **dict(servicex or {}))


__all__ = ["DeliveryError", "DeliveryReport", "deliver", "deliver_local"]
