"""The coffea side: :class:`AGCProcessor` over coffea's ``Runner``, its executors and the BDT models per worker.

:class:`AGCProcessor` returns one :class:`~.chunk.ChunkResult` per chunk, which coffea adds into one running
total as chunks complete, so memory does not grow with the number of chunks.
"""

from __future__ import annotations

import contextlib
import functools
import io
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coffea import processor

from .. import remote
from ..errors import ProcessError
from ..options import EXECUTORS, one_of
from ..schema import AGCSkimSchema, needed_columns
from .chunk import ChunkResult, MLConfig, analyse_events, read_columns


class AGCProcessor(processor.ProcessorABC):
    """coffea processor: one :class:`ChunkResult` per chunk, keyed so that merging order is canonical.

    ``samples`` maps the fileset name (``process__variation``) to (process, variation, weight). The BDT models
    are loaded lazily in each worker (boosters are not shipped with the processor). ``skim`` applies the
    delivery skim first (direct NanoAOD input); ``io_only`` reads ``columns`` and does nothing else.
    """

    def __init__(self, samples: Mapping[str, tuple[str, str, float]], *, ml: bool = False,
                 models_dir: Path | None = None, nthread: int = 1, skim: bool = False,
                 io_only: bool = False) -> None:
        self.samples = dict(samples)
        self.ml = ml
        self.models_dir = models_dir
        self.nthread = nthread
        self.skim = skim
        self.io_only = io_only
        self._ml_config: MLConfig | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ml_config"] = None
        return state

    def ml_config(self) -> MLConfig | None:
        """The BDT configuration, models loaded on first use in this process (None without the BDT)."""
        if not self.ml:
            return None
        if self._ml_config is None:
            self._ml_config = MLConfig(_load_models(resolve_models_dir(self.models_dir).resolve()), self.nthread)
        return self._ml_config

    def process(self, events: Any) -> ChunkResult:
        """One chunk of one sample (coffea's entry point)."""
        remote.configure()  # this worker inflates the chunk's baskets with ISA-L too
        meta = events.metadata
        process_name, variation, weight = self.samples[meta["dataset"]]
        if self.io_only:
            t0 = time.thread_time()
            n_bytes = read_columns(events, needed_columns(self.ml))
            result = ChunkResult(events={meta["dataset"]: len(events)}, bytes_read=n_bytes, chunks=1,
                                 cpu_seconds=time.thread_time() - t0)
        else:
            result = analyse_events(events, process_name, variation, weight, ml=self.ml_config(),
                                    sample=meta["dataset"], skim=self.skim)
        return result

    def postprocess(self, accumulator: Any) -> Any:
        """Nothing to do: the summed :class:`ChunkResult` is the result."""
        return accumulator


_MODELS_LOCK = threading.Lock()


@functools.cache
def _load_models_cached(directory: Path) -> Any:
    from ..ml import BDTModels

    return BDTModels.load(directory)


def _load_models(directory: Path) -> Any:
    """BDT models, loaded once per worker process (coffea ships a fresh copy of the processor per chunk)."""
    with _MODELS_LOCK:
        return _load_models_cached(directory)


def resolve_models_dir(models_dir: Path | None) -> Path:
    """``models_dir``, or the bundled models when None."""
    if models_dir is not None:
        return Path(models_dir)
    from ..resources import default_models_dir

    return default_models_dir()


def check_models(models_dir: Path | None) -> None:
    """Load the BDT models once, so that missing or broken ones are refused (``ModelError``) before any work."""
    _load_models(resolve_models_dir(models_dir).resolve())


def analyse_file(path: str | Path, process: str, variation: str, weight: float, *, ml: bool = False,
                 models_dir: Path | None = None, sample: str | None = None, nthread: int = 1) -> ChunkResult:
    """One delivered parquet file as one chunk, outside coffea's Runner (streaming feeds files one by one)."""
    from coffea.nanoevents import NanoEventsFactory

    events = NanoEventsFactory.from_parquet(str(path), schemaclass=AGCSkimSchema, mode="virtual").events()
    config = MLConfig(_load_models(resolve_models_dir(models_dir).resolve()), nthread) if ml else None
    return analyse_events(events, process, variation, weight, ml=config, sample=sample)


def check_options(executor: str, workers: int, scheduler: str | None, chunksize: int | None) -> None:
    """Refuse (ProcessError, one line) option values no executor can run with."""
    if (problem := one_of("executor", executor, EXECUTORS)) is not None:
        raise ProcessError(problem)
    if workers < 1:
        raise ProcessError("--workers must be at least 1")
    if chunksize is not None and chunksize < 1:
        raise ProcessError("--chunksize must be at least 1")
    if scheduler and executor != "dask":
        raise ProcessError("--scheduler only applies to --executor dask")


def _make_executor(executor: str, workers: int, scheduler: str | None, quiet: bool) -> tuple[Any, Any]:
    """The coffea executor and, for dask, the client to close afterwards."""
    # retries=0: network reads are retried with back-off by agc_sx.remote.NetworkSource; anything else fails alike
    if executor == "iterative":
        return processor.IterativeExecutor(status=not quiet, retries=0), None
    if executor == "futures":
        if workers == 1:  # one worker: the same work in this process, without a pool to start
            return processor.IterativeExecutor(status=not quiet, retries=0), None
        return processor.FuturesExecutor(workers=workers, status=not quiet, retries=0), None
    # dask (check_options refused anything else)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ProcessError("--executor dask needs Dask: pip install 'agc-sx[dask]'") from None

    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    return processor.DaskExecutor(client=client, status=not quiet, retries=0), client


def run_runner(fileset: dict[str, dict[str, Any]], proc: AGCProcessor, *, fmt: str, treename: str,
                executor: str, workers: int, scheduler: str | None, chunksize: int,
                quiet: bool) -> tuple[ChunkResult, dict[str, Any]]:
    """Coffea's Runner over ``fileset``: the summed chunk results and coffea's metrics (columns, bytes)."""
    if not fileset:
        return ChunkResult(), {}
    exe, client = _make_executor(executor, workers, scheduler, quiet)
    try:
        runner = processor.Runner(executor=exe, pre_executor=processor.IterativeExecutor(status=False),
                                  schema=AGCSkimSchema, format=fmt, chunksize=chunksize, savemetrics=True)
        # coffea 2026.9 shows its rich progress bars even with status=False: silence them for --quiet
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            options = remote.uproot_options() if fmt == "root" else {}
            total, metrics = runner(fileset, proc, treename=treename, uproot_options=options)
    finally:
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
    return total, dict(metrics)


def columns_touched(metrics: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(branches, buffers) coffea materialised, from the Runner's ``savemetrics`` access log.

    Buffers are ``{branch}-{data|offsets}``; a branch counts as read when any of its buffers was.
    """
    buffers = sorted(str(b) for b in metrics.get("columns", ()))
    return sorted({b.rsplit("-", 1)[0] for b in buffers}), buffers

