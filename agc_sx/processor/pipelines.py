"""The batch pipelines: a delivery folder (:func:`run_processor`) or a catalogue's NanoAOD (:func:`run_direct`).

Both are the same skeleton (:func:`_run`): plan the inputs and refuse anything unusable before any processing,
run :class:`~.coffea_processor.AGCProcessor` through coffea's Runner, write the outputs as one set. They
differ only in what they plan: parquet of the delivery checked against its manifest, or NanoAOD ROOT files
with the delivery skim applied in the processor first, so that both give identical histograms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import remote
from ..catalogue import Catalog, event_weight, load_catalog
from ..errors import ProcessError
from ..manifest import Manifest, SampleRecord, contained
from ..schema import check_parquet_schema, needed_columns
from .coffea_processor import AGCProcessor, check_models, check_options, columns_touched, run_runner
from .metrics import RunInfo, RunResult, Stages, write_outputs

#: Events per chunk when reading NanoAOD ROOT files directly (real files hold up to ~1 M events). The peak
#: memory of a worker is set by it, not by the dataset (benchmarks/memory.py, without the BDT: 0.88 GB for
#: 19.6 M events in 14 files; 250,000 per chunk: 1.8 GB, 15 % faster), so that a worker stays within 1 GB.
DIRECT_CHUNKSIZE = 100_000


def sample_weight(record: SampleRecord) -> float:
    """Per-event normalisation of a delivered sample (:func:`agc_sx.catalogue.event_weight`)."""
    if record.nevts_total <= 0:
        raise ProcessError(f"sample {record.name} has no delivered input events to normalise to")
    return event_weight(record.xsec, record.nevts_total)


def parquet_column_bytes(path: Path, columns: list[str], meta: Any = None) -> int:
    """Compressed bytes of ``columns`` in a parquet file (or its footer ``meta``): what reading them costs."""
    import pyarrow.parquet as pq

    meta = meta if meta is not None else pq.ParquetFile(path).metadata
    wanted = set(columns)
    total = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.path_in_schema.split(".")[0] in wanted:
                total += col.total_compressed_size
    return total


@dataclass
class _Inputs:
    """What a pipeline processes and how; ``rows`` and ``bytes_read`` None: taken from what was read."""

    input: str
    fileset: dict[str, dict[str, Any]]
    samples: dict[str, tuple[str, str, float]]
    files: int
    fmt: str
    treename: str
    chunksize: int
    skim: bool = False
    paths: list[str] = field(default_factory=list)
    rows: dict[str, int] | None = None
    bytes_read: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Options:
    executor: str
    workers: int
    scheduler: str | None
    chunksize: int | None
    ml: bool
    models_dir: Path | None
    quiet: bool
    io_only: bool


def _run(pipeline: str, plan: Callable[[list[str]], _Inputs], output: Path, opts: _Options) -> RunResult:
    """Plan (every check before any processing), process through coffea's Runner, write the outputs."""
    check_options(opts.executor, opts.workers, opts.scheduler, opts.chunksize)
    wall0 = time.perf_counter()
    stage = Stages()
    columns = needed_columns(opts.ml)
    with stage("plan"):
        inputs = plan(columns)
        nthread = opts.workers if opts.executor == "iterative" else 1
        proc = AGCProcessor(inputs.samples, ml=opts.ml, models_dir=opts.models_dir, nthread=nthread,
                            skim=inputs.skim, io_only=opts.io_only)
        if opts.ml and not opts.io_only:
            check_models(opts.models_dir)  # fail early (and once) on missing or broken models
    with stage("process"):
        try:
            total, coffea_metrics = run_runner(
                inputs.fileset, proc, fmt=inputs.fmt, treename=inputs.treename, executor=opts.executor,
                workers=opts.workers, scheduler=opts.scheduler, chunksize=inputs.chunksize, quiet=opts.quiet)
        except Exception as err:
            reason = remote.explain_any(err, inputs.paths) if inputs.paths else None
            if reason is None:
                raise
            raise ProcessError(f"cannot read the input files: {reason}") from None
    branches, buffers = columns_touched(coffea_metrics)
    bytes_read = int(coffea_metrics.get("bytesread", 0))
    extra: dict[str, Any] = {"scheduler": opts.scheduler, "chunksize": inputs.chunksize,
                             "columns_read": branches, "buffers_read": buffers}
    if inputs.paths:  # what came over the network: known when all inputs are remote, or none
        n_remote = sum(remote.is_remote(p) for p in inputs.paths)
        extra["bytes_read_network"] = bytes_read if n_remote == len(inputs.paths) else (0 if not n_remote else None)
    info = RunInfo(
        pipeline=pipeline, input=inputs.input, samples=inputs.samples,
        rows=inputs.rows if inputs.rows is not None else dict(total.skimmed), files=inputs.files,
        bytes_read=inputs.bytes_read if inputs.bytes_read is not None else bytes_read, columns=columns,
        executor=opts.executor, workers=opts.workers, started=wall0, ml=opts.ml, io_only=opts.io_only,
        stages=stage.stages, extra={**extra, **inputs.extra},
    )
    return write_outputs(total, output, info)


@dataclass
class DeliveryPlan:
    """The checked content of a delivery folder: the coffea fileset and what metrics.json reports of it."""

    fileset: dict[str, dict[str, Any]]
    samples: dict[str, tuple[str, str, float]]
    max_rows: int
    rows: dict[str, int]
    bytes_read: int
    files: int
    incomplete: dict[str, str]  # samples processed although incomplete (--allow-incomplete) -> what is missing


def plan_inputs(manifest: Manifest, *, allow_incomplete: bool, columns: list[str]) -> DeliveryPlan:
    """Check every sample and file of a delivery and build the coffea fileset; refuse anything unusable."""
    import pyarrow.parquet as pq

    if not manifest.samples:
        raise ProcessError(f"{manifest.path} lists no samples")
    plan = DeliveryPlan({}, {}, 0, {}, 0, 0, {})
    for name in sorted(manifest.samples):
        record = manifest.samples[name]
        if record.status != "complete":
            missing = f"{len(record.outputs)} of {len(record.inputs)} files delivered"
            if not allow_incomplete:
                raise ProcessError(
                    f"sample {record.name} is {record.status} ({missing}); finish the delivery or pass "
                    "--allow-incomplete"
                )
            plan.incomplete[record.name] = missing
            if not record.outputs:
                continue
        files = []
        for out in sorted(record.outputs, key=lambda o: o.file):
            problem = out.verify(manifest.base)
            if problem is not None:
                raise ProcessError(f"sample {record.name}: {problem}")
            path = contained(manifest.base, out.file)
            check_parquet_schema(path, columns)
            meta = pq.ParquetFile(path).metadata
            if meta.num_rows != out.rows:
                raise ProcessError(
                    f"sample {record.name}: {out.file} holds {meta.num_rows} rows, the manifest says {out.rows}"
                )
            if out.rows > 0:
                files.append(str(path))
                plan.max_rows = max(plan.max_rows, out.rows)
                plan.bytes_read += parquet_column_bytes(path, columns, meta)
        plan.samples[record.name] = (record.process, record.variation, sample_weight(record))
        plan.rows[record.name] = record.rows
        plan.files += len(files)
        if files:
            plan.fileset[record.name] = {"files": files, "treename": "events"}
    return plan


def run_processor(
    input_dir: Path,
    *,
    output: Path = Path("histograms.root"),
    executor: str = "iterative",
    workers: int = 1,
    scheduler: str | None = None,
    chunksize: int | None = None,
    allow_incomplete: bool = False,
    ml: bool = True,
    models_dir: Path | None = None,
    quiet: bool = False,
    io_only: bool = False,
) -> RunResult:
    """Process a delivery folder into ``output`` (histograms.root), ``histograms_ml.root`` and metrics.json.

    Every check (manifest, sample status, checksums, column types, BDT models) runs before any processing, so
    a refused input never leaves a histograms file behind; outputs are written as one set at the very end.

    Args:
        input_dir: the delivery folder (``manifest.json`` and the samples' parquet).
        output: path of histograms.root; histograms_ml.root and metrics.json go beside it.
        executor: one of :data:`agc_sx.options.EXECUTORS`.
        workers: worker processes (futures, dask) or xgboost threads (iterative).
        scheduler: address of a running Dask scheduler (``executor="dask"`` only).
        chunksize: events per chunk; default one file per chunk.
        allow_incomplete: process samples that are not completely delivered (recorded in metrics.json).
        ml: fill the BDT observables (histograms_ml.root).
        models_dir: the BDT models; default the bundled ones.
        quiet: no progress bars.
        io_only: read the needed columns and nothing else; write only metrics.json (the I/O ceiling).
    """
    def plan(columns: list[str]) -> _Inputs:
        delivery = plan_inputs(Manifest.load(input_dir), allow_incomplete=allow_incomplete, columns=columns)
        return _Inputs(
            input=str(Path(input_dir).resolve()), fileset=delivery.fileset, samples=delivery.samples,
            files=delivery.files, fmt="parquet", treename="events",
            chunksize=chunksize or max(delivery.max_rows, 1), rows=delivery.rows, bytes_read=delivery.bytes_read,
            extra={"allow_incomplete": allow_incomplete, "incomplete_samples": delivery.incomplete},
        )

    return _run("deliver+process", plan, Path(output),
                _Options(executor, workers, scheduler, chunksize, ml, models_dir, quiet, io_only))


def run_direct(
    catalog: Catalog | Path | str,
    *,
    n_files: int | None = None,
    samples: list[str] | None = None,
    output: Path = Path("histograms.root"),
    executor: str = "iterative",
    workers: int = 1,
    scheduler: str | None = None,
    chunksize: int | None = None,
    ml: bool = True,
    models_dir: Path | None = None,
    quiet: bool = False,
    io_only: bool = False,
) -> RunResult:
    """The ``coffea`` pipeline: process the catalogue's NanoAOD ROOT files directly, no delivery.

    The skim is applied in the processor first, so the histograms equal deliver(local) + process of the same
    files; normalisation uses the catalogue's ``nevts`` of the files processed. Any path uproot opens works
    (local, ``root://``, ``https://``); only the needed branches are read.

    Args:
        catalog: a loaded catalogue or the path of one (``ntuples.json`` layout).
        n_files: the first ``n_files`` files of each sample; default all.
        samples: fileset names to process; default all.
        output: path of histograms.root; histograms_ml.root and metrics.json go beside it.
        executor: one of :data:`agc_sx.options.EXECUTORS`.
        workers: worker processes (futures, dask) or xgboost threads (iterative).
        scheduler: address of a running Dask scheduler (``executor="dask"`` only).
        chunksize: events per chunk; default :data:`DIRECT_CHUNKSIZE`.
        ml: fill the BDT observables (histograms_ml.root).
        models_dir: the BDT models; default the bundled ones.
        quiet: no progress bars.
        io_only: read the needed columns and nothing else; write only metrics.json.
    """
    def plan(columns: list[str]) -> _Inputs:
        cat = (catalog if isinstance(catalog, Catalog) else load_catalog(catalog)).select(samples, n_files)
        if not len(cat):
            raise ProcessError(f"{cat.source}: no samples selected")
        return _Inputs(
            input=str(cat.source), fileset={s.name: {"files": {f.path: "Events" for f in s.files}} for s in cat},
            samples={s.name: (s.process, s.variation, s.weight) for s in cat}, files=cat.n_files, fmt="root",
            treename="Events", chunksize=chunksize or DIRECT_CHUNKSIZE, skim=True,
            paths=[f.path for s in cat for f in s.files],
            extra={"nevts_per_sample": {s.name: s.nevts_total for s in cat}},
        )

    return _run("direct", plan, Path(output),
                _Options(executor, workers, scheduler, chunksize, ml, models_dir, quiet, io_only))
