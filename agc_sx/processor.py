"""The coffea processor of the AGC v2 ttbar analysis and ``run_processor`` (``agc-sx process``).

Physics lives in :func:`analyse_events`, which takes any events array with ``run``, ``luminosityBlock``,
``event`` and ``Jet`` / ``Electron`` / ``Muon`` collections, so direct NanoAOD processing and streaming can call
it unchanged. :class:`AGCProcessor` wraps it for coffea's ``Runner`` and returns one :class:`ChunkResult` per
chunk, which coffea adds into one running total as chunks complete, so memory does not grow with the number of
chunks. With the exact (integer) histogram sums of :mod:`agc_sx.histograms` the result is bit-identical whatever
the executor, worker count, chunking or completion order.

Two drivers feed it through coffea's Runner: :func:`run_processor` (a delivery folder, ``format="parquet"``) and
:func:`run_direct` (a catalogue's NanoAOD ROOT files, ``format="root"``, the delivery skim applied in the
processor first so both give identical histograms). Both can run ``io_only`` (read the needed columns, nothing
else) and record in metrics.json the pipeline, the columns coffea actually touched, bytes, events and the wall
and CPU time per stage.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import awkward as ak
import hist
import numpy as np
from coffea import processor

from . import __version__, remote
from .catalogue import Catalog
from .constants import HIST_BINS, HIST_RANGE, JET_VARIATIONS, LUMI_PB, REGIONS, TTBAR_ALTERNATIVES
from .errors import AgcSxError
from .histograms import ML_OUTPUT_NAME, ExactHist, bin_index, build_output, write_root
from .manifest import Manifest, ManifestError, SampleRecord, contained
from .schema import COLLECTIONS, AGCSkimSchema, SchemaError, check_parquet_schema, needed_columns
from .selection import (
    Collection,
    btag_mask,
    flat_column,
    jet_mask,
    jet_mask_fixed,
    select_leptons,
    select_variations,
    selected_jets,
    single_lepton,
    skim_mask,
)
from .systematics import btag_weight_factors, jet_pt_variations, scale_var_factors
from .utils import OutputSet

EXECUTORS = ("iterative", "futures", "dask")
METRICS_NAME = "metrics.json"

HistKey = tuple[str, str, str]  # (region or ML feature, process, variation)


class ProcessError(AgcSxError, ValueError):
    """Input the processor refuses (incomplete sample, bad column, checksum mismatch, bad option)."""


# --------------------------------------------------------------------------------------------------------------
# physics on one chunk


@dataclass
class ChunkResult:
    """Exact histograms and counters of one chunk (or of a merge of chunks)."""

    hists: dict[HistKey, ExactHist] = field(default_factory=dict)
    ml_hists: dict[HistKey, ExactHist] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # per sample: events read
    skimmed: dict[str, int] = field(default_factory=dict)  # per sample: events after the skim (= read for parquet)
    bytes_read: int = 0  # bytes materialised (filled by --io-only)
    region_events: dict[str, dict[str, int]] = field(default_factory=dict)  # sample -> region -> events
    cpu_seconds: float = 0.0
    chunks: int = 0

    def __iadd__(self, other: ChunkResult) -> ChunkResult:
        for mine, theirs in ((self.hists, other.hists), (self.ml_hists, other.ml_hists)):
            for key, h in theirs.items():
                if key in mine:
                    mine[key] += h
                else:
                    mine[key] = h + ExactHist(h.bins, h.lo, h.hi)
        for mine_n, theirs_n in ((self.events, other.events), (self.skimmed, other.skimmed)):
            for sample, n in theirs_n.items():
                mine_n[sample] = mine_n.get(sample, 0) + n
        self.bytes_read += other.bytes_read
        for sample, regions in other.region_events.items():
            mine_r = self.region_events.setdefault(sample, {})
            for region, n in regions.items():
                mine_r[region] = mine_r.get(region, 0) + n
        self.cpu_seconds += other.cpu_seconds
        self.chunks += other.chunks
        return self

    def __add__(self, other: ChunkResult) -> ChunkResult:
        out = ChunkResult()
        out += self
        out += other
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data for the streaming checkpoint (JSON: nothing in the user's folder is ever unpickled)."""
        return {
            "hists": [[list(k), h.to_json()] for k, h in sorted(self.hists.items())],
            "ml_hists": [[list(k), h.to_json()] for k, h in sorted(self.ml_hists.items())],
            "events": self.events, "skimmed": self.skimmed, "bytes_read": self.bytes_read,
            "region_events": self.region_events, "cpu_seconds": self.cpu_seconds, "chunks": self.chunks,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ChunkResult:
        """The inverse of :meth:`to_json`, validated field by field; ValueError on anything else."""
        if not isinstance(doc, dict) or set(doc) != set(cls().to_json()):
            raise ValueError("not a result record")

        def hists(items: Any) -> dict[HistKey, ExactHist]:
            if not isinstance(items, list):
                raise ValueError("bad histogram list")
            out: dict[HistKey, ExactHist] = {}
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
                        and len(item[0]) == 3 and all(isinstance(x, str) for x in item[0])):
                    raise ValueError("bad histogram key")
                out[(item[0][0], item[0][1], item[0][2])] = ExactHist.from_json(item[1])
            return out

        def counts(d: Any) -> dict[str, int]:
            if not (isinstance(d, dict) and all(type(v) is int and v >= 0 for v in d.values())):
                raise ValueError("bad event counts")
            return dict(d)

        regions = doc["region_events"]
        if not isinstance(regions, dict):
            raise ValueError("bad region counts")
        numbers = (doc["bytes_read"], doc["chunks"])
        if not all(type(n) is int and n >= 0 for n in numbers) or not isinstance(doc["cpu_seconds"], (int, float)):
            raise ValueError("bad counters")
        return cls(hists(doc["hists"]), hists(doc["ml_hists"]), counts(doc["events"]), counts(doc["skimmed"]),
                   doc["bytes_read"], {s: counts(r) for s, r in regions.items()}, float(doc["cpu_seconds"]),
                   doc["chunks"])


@dataclass
class MLConfig:
    """What the BDT hook needs: the loaded models and the xgboost thread count."""

    models: Any  # agc_sx.ml.BDTModels
    nthread: int = 1


def _hist(store: dict[HistKey, ExactHist], key: HistKey,
          binning: tuple[int, float, float] | None = None) -> ExactHist:
    if key not in store:
        store[key] = ExactHist(*binning) if binning else ExactHist()
    return store[key]


def _fill(store: dict[HistKey, ExactHist], key: HistKey, values: np.ndarray, weights: np.ndarray | float,
          binning: tuple[int, float, float] | None = None) -> None:
    _hist(store, key, binning).fill(values, weights)


def _jet_fields(ml: bool) -> tuple[str, ...]:
    return ("pt", "eta", "phi", "mass", "btagCSVV2", "jetId") + (("qgl",) if ml else ())


def analyse_events(events: Any, process: str, variation: str, weight: float, *,
                   ml: MLConfig | None = None, sample: str | None = None, skim: bool = False) -> ChunkResult:
    """Select, reconstruct and histogram one chunk of events of one sample (``process``, ``variation``).

    ``weight`` is the per-event normalisation ``xsec * lumi / nevts_total``. For ``nominal`` samples the jet
    variations (``pt_scale_up``, ``pt_res_up``) and the weight variations are filled too; other samples (the
    ttbar alternatives) are filled once, under their variation name. ``skim`` applies the delivery skim first
    (direct processing of unskimmed NanoAOD), so that the result equals deliver + process.
    """
    t0 = time.thread_time()
    sample = sample or f"{process}__{variation}"
    lep_p4 = ("phi", "mass") if ml else ()
    jets = Collection.from_awkward(events.Jet, _jet_fields(ml is not None))
    electrons = Collection.from_awkward(events.Electron, ("pt", "eta", "cutBased", "sip3d", *lep_p4))
    muons = Collection.from_awkward(events.Muon, ("pt", "eta", "tightId", "sip3d", "pfRelIso04_all", *lep_p4))
    run = flat_column(events.run)
    lumi = flat_column(events.luminosityBlock)
    event_number = flat_column(events.event)
    n_read = len(run)

    leptons = select_leptons(electrons, muons)
    if skim:
        keep = skim_mask(jets, leptons)
        jets, electrons, muons = jets.take(keep), electrons.take(keep), muons.take(keep)
        run, lumi, event_number = run[keep], lumi[keep], event_number[keep]
        leptons = select_leptons(electrons, muons)  # recomputed on the kept events (cheap, flat cuts)
    fixed, tagged = jet_mask_fixed(jets), btag_mask(jets)
    varied = variation == "nominal"
    vsel = select_variations(jets, leptons.one_lepton, run, lumi, event_number, variations=varied,
                             fixed_mask=fixed, tagged=tagged)

    out = ChunkResult(events={sample: n_read}, skimmed={sample: len(run)}, chunks=1)
    pts: dict[str, np.ndarray] | None = None
    feature_bins = None
    if ml is not None:
        from .ml import FEATURES

        feature_bins = FEATURES
    for v, jet_variation in enumerate(JET_VARIATIONS if varied else ("nominal",)):
        name = variation if jet_variation == "nominal" else jet_variation
        for region in REGIONS:
            in_region = vsel.in_region(v, region)
            obs = vsel.obs[v][in_region]
            index = bin_index(obs, HIST_BINS, *HIST_RANGE)
            weights: dict[str, np.ndarray | float] = {name: weight}
            if jet_variation == "nominal":
                out.region_events.setdefault(sample, {})[region] = len(obs)
                if varied:
                    for wname, factor in btag_weight_factors(vsel.lead_pt[in_region]).items():
                        weights[wname] = weight * factor
                    if process == "wjets":
                        for wname, f in scale_var_factors().items():
                            weights[wname] = weight * f
            for wname, w in weights.items():
                _hist(out.hists, (region, process, wname)).fill_binned(index, w)
            if ml is not None and feature_bins is not None and region == "4j2b" and len(obs):
                from .ml import best_permutation_features

                if pts is None:
                    pts = (jet_pt_variations(jets["pt"], run, lumi, event_number, jets.offsets) if varied
                           else {"nominal": jets["pt"]})
                pt = pts[jet_variation]
                features = best_permutation_features(
                    selected_jets(jets, pt, jet_mask(pt, fixed), in_region),
                    single_lepton(electrons, muons, leptons, in_region),
                    event_number[in_region], ml.models, nthread=ml.nthread,
                )
                for i, (feature, bins, lo, hi) in enumerate(feature_bins):
                    for wname, w in weights.items():
                        _fill(out.ml_hists, (feature, process, wname), features[:, i], w, (bins, lo, hi))
    out.cpu_seconds = time.thread_time() - t0
    return out


def read_columns(events: Any, columns: list[str]) -> int:
    """Read (materialise) exactly ``columns`` of a chunk and nothing else: the I/O ceiling (``--io-only``).

    Returns the number of bytes materialised. Collection columns are named as in the file (``Jet_pt``).
    """
    total = 0
    for name in columns:
        coll, _, field_name = name.partition("_")
        if coll in COLLECTIONS and field_name:
            c = Collection.from_awkward(events[coll], (field_name,))
            total += c.offsets.nbytes + c.fields[field_name].nbytes
        else:
            total += flat_column(events[name]).nbytes
    return total


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
        if not self.ml:
            return None
        if self._ml_config is None:
            self._ml_config = MLConfig(_load_models(resolve_models_dir(self.models_dir).resolve()), self.nthread)
        return self._ml_config

    def process(self, events: Any) -> ChunkResult:
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
        return accumulator


_MODELS_LOCK = threading.Lock()


@functools.cache
def _load_models_cached(directory: Path) -> Any:
    from .ml import BDTModels

    return BDTModels.load(directory)


def _load_models(directory: Path) -> Any:
    """BDT models, loaded once per worker process (coffea ships a fresh copy of the processor per chunk)."""
    with _MODELS_LOCK:
        return _load_models_cached(directory)




# --------------------------------------------------------------------------------------------------------------
# driver


@dataclass
class RunResult:
    """What ``run_processor`` produced: the written histograms, the metrics and the output paths."""

    histograms: dict[str, hist.Hist]
    ml_histograms: dict[str, hist.Hist]
    metrics: dict[str, Any]
    output: Path
    ml_output: Path | None
    metrics_path: Path


def resolve_models_dir(models_dir: Path | None) -> Path:
    """``models_dir``, or the bundled models when None."""
    if models_dir is not None:
        return Path(models_dir)
    from .resources import default_models_dir

    return default_models_dir()



def check_models(models_dir: Path | None) -> None:
    """Load the BDT models once to refuse (``ProcessError``) missing or broken ones before any processing."""
    from .ml import ModelError

    try:
        _load_models(resolve_models_dir(models_dir).resolve())
    except (ModelError, FileNotFoundError) as err:
        raise ProcessError(str(err)) from None


def analyse_file(path: str | Path, process: str, variation: str, weight: float, *, ml: bool = False,
                 models_dir: Path | None = None, sample: str | None = None, nthread: int = 1) -> ChunkResult:
    """One delivered parquet file as one chunk, outside coffea's Runner (streaming feeds files one by one)."""
    from coffea.nanoevents import NanoEventsFactory

    events = NanoEventsFactory.from_parquet(str(path), schemaclass=AGCSkimSchema, mode="virtual").events()
    config = MLConfig(_load_models(resolve_models_dir(models_dir).resolve()), nthread) if ml else None
    return analyse_events(events, process, variation, weight, ml=config, sample=sample)


def sample_weight(record: SampleRecord) -> float:
    """Per-event normalisation ``xsec * lumi / nevts_total`` (AGC order of operations)."""
    if record.nevts_total <= 0:
        raise ProcessError(f"sample {record.name} has no delivered input events to normalise to")
    return record.xsec * LUMI_PB / record.nevts_total


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
class _Plan:
    fileset: dict[str, dict[str, Any]]
    samples: dict[str, tuple[str, str, float]]
    max_rows: int
    rows: dict[str, int]
    bytes_read: int
    files: int
    incomplete: dict[str, str]  # samples processed although incomplete (--allow-incomplete) -> what is missing


def plan_inputs(manifest: Manifest, *, allow_incomplete: bool, columns: list[str]) -> _Plan:
    """Check every sample and file of a delivery and build the coffea fileset; refuse anything unusable."""
    import pyarrow.parquet as pq

    if not manifest.samples:
        raise ProcessError(f"{manifest.path} lists no samples")
    fileset: dict[str, dict[str, Any]] = {}
    samples: dict[str, tuple[str, str, float]] = {}
    rows: dict[str, int] = {}
    max_rows = 0
    bytes_read = 0
    n_files = 0
    incomplete: dict[str, str] = {}
    for name in sorted(manifest.samples):
        record = manifest.samples[name]
        if record.status != "complete":
            missing = f"{len(record.outputs)} of {len(record.inputs)} files delivered"
            if not allow_incomplete:
                raise ProcessError(
                    f"sample {record.name} is {record.status} ({missing}); finish the delivery or pass "
                    "--allow-incomplete"
                )
            incomplete[record.name] = missing
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
                max_rows = max(max_rows, out.rows)
                bytes_read += parquet_column_bytes(path, columns, meta)
        samples[record.name] = (record.process, record.variation, sample_weight(record))
        rows[record.name] = record.rows
        n_files += len(files)
        if files:
            fileset[record.name] = {"files": files, "treename": "events"}
    return _Plan(fileset, samples, max_rows, rows, bytes_read, n_files, incomplete)


def _executor(executor: str, workers: int, scheduler: str | None, quiet: bool) -> tuple[Any, Any]:
    """The coffea executor and, for dask, the client to close afterwards."""
    # retries=0: network reads are retried with back-off by agc_sx.remote.NetworkSource; anything else fails alike
    if executor == "iterative":
        return processor.IterativeExecutor(status=not quiet, retries=0), None
    if executor == "futures":
        if workers == 1:  # one worker: the same work in this process, without a pool to start
            return processor.IterativeExecutor(status=not quiet, retries=0), None
        return processor.FuturesExecutor(workers=workers, status=not quiet, retries=0), None
    if executor == "dask":
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
    raise ProcessError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")


def _versions() -> dict[str, str]:
    import coffea
    import numba
    import uproot

    return {"agc-sx": __version__, "python": platform.python_version(), "coffea": coffea.__version__,
            "awkward": ak.__version__, "uproot": uproot.__version__, "numpy": np.__version__,
            "numba": numba.__version__, "hist": hist.__version__}


def _finalise(store: Mapping[HistKey, ExactHist], groups: Any, label: str) -> dict[str, hist.Hist]:
    return build_output({k: h.to_hist(label) for k, h in store.items()}, groups)


class _Stages:
    """Wall and driver CPU time per stage of a run (``metrics.json`` ``stages``)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.stages[name] = {"wall_seconds": time.perf_counter() - w0,
                                 "cpu_seconds_driver": time.process_time() - c0}


def _check_options(executor: str, workers: int, scheduler: str | None, chunksize: int | None) -> None:
    if executor not in EXECUTORS:
        raise ProcessError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if workers < 1:
        raise ProcessError("--workers must be at least 1")
    if chunksize is not None and chunksize < 1:
        raise ProcessError("--chunksize must be at least 1")
    if scheduler and executor != "dask":
        raise ProcessError("--scheduler only applies to --executor dask")


def _run_runner(fileset: dict[str, dict[str, Any]], proc: AGCProcessor, *, fmt: str, treename: str,
                executor: str, workers: int, scheduler: str | None, chunksize: int,
                quiet: bool) -> tuple[ChunkResult, dict[str, Any]]:
    """coffea's Runner over ``fileset``: the summed chunk results and coffea's metrics (columns, bytes)."""
    if not fileset:
        return ChunkResult(), {}
    exe, client = _executor(executor, workers, scheduler, quiet)
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
    a refused input never leaves a histograms file behind; outputs are written atomically at the very end.
    ``io_only`` reads the needed columns, does nothing else and writes only metrics.json (the I/O ceiling).
    """
    _check_options(executor, workers, scheduler, chunksize)
    output = Path(output)
    wall0 = time.perf_counter()
    stage = _Stages()
    with stage("plan"):
        manifest = Manifest.load(input_dir)
        columns = needed_columns(ml)
        plan = plan_inputs(manifest, allow_incomplete=allow_incomplete, columns=columns)
        nthread = workers if executor == "iterative" else 1
        proc = AGCProcessor(plan.samples, ml=ml, models_dir=models_dir, nthread=nthread, io_only=io_only)
        if ml and not io_only:
            check_models(models_dir)  # fail early (and once) on missing or broken models
    with stage("process"):
        total, coffea_metrics = _run_runner(
            plan.fileset, proc, fmt="parquet", treename="events", executor=executor, workers=workers,
            scheduler=scheduler, chunksize=chunksize or max(plan.max_rows, 1), quiet=quiet)
    branches, buffers = columns_touched(coffea_metrics)
    return write_outputs(
        total, output, ml=ml, started=wall0, samples=plan.samples, rows=plan.rows, files=plan.files,
        bytes_read=plan.bytes_read, columns=columns, executor=executor, workers=workers,
        extra={"input": str(Path(input_dir).resolve()), "scheduler": scheduler,
               "chunksize": chunksize or max(plan.max_rows, 1), "columns_read": branches,
               "buffers_read": buffers, "allow_incomplete": allow_incomplete,
               "incomplete_samples": plan.incomplete},
        pipeline="deliver+process", stages=stage.stages, io_only=io_only,
    )


#: Events per chunk when reading NanoAOD ROOT files directly (real files hold up to ~1 M events).
DIRECT_CHUNKSIZE = 250_000


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
    files; normalisation uses the catalogue's ``nevts`` of the files processed (the first ``n_files`` of each
    sample). Any path uproot opens works (local, ``root://``, ``https://``); only the needed branches are read.
    """
    from .catalogue import CatalogError, load_catalog

    _check_options(executor, workers, scheduler, chunksize)
    output = Path(output)
    wall0 = time.perf_counter()
    stage = _Stages()
    with stage("plan"):
        cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
        try:
            cat = cat.select(samples, n_files)
        except CatalogError as err:
            raise ProcessError(str(err)) from None
        weights: dict[str, tuple[str, str, float]] = {}
        fileset: dict[str, dict[str, Any]] = {}
        for sample in cat:
            if sample.nevts_total <= 0:
                raise ProcessError(f"sample {sample.name} has no input events to normalise to (nevts 0)")
            # the same expression as sample_weight() of a delivery, so both pipelines weight identically
            weights[sample.name] = (sample.process, sample.variation, sample.xsec * LUMI_PB / sample.nevts_total)
            fileset[sample.name] = {"files": {f.path: "Events" for f in sample.files}}
        if not fileset:
            raise ProcessError(f"{cat.source}: no samples selected")
        columns = needed_columns(ml)
        nthread = workers if executor == "iterative" else 1
        proc = AGCProcessor(weights, ml=ml, models_dir=models_dir, nthread=nthread, skim=True, io_only=io_only)
        if ml and not io_only:
            check_models(models_dir)
    with stage("process"):
        try:
            total, coffea_metrics = _run_runner(
                fileset, proc, fmt="root", treename="Events", executor=executor, workers=workers,
                scheduler=scheduler, chunksize=chunksize or DIRECT_CHUNKSIZE, quiet=quiet)
        except Exception as err:
            reason = remote.explain_any(err, [f.path for s in cat for f in s.files])
            if reason is None:
                raise
            raise ProcessError(f"cannot read the input files: {reason}") from None
    branches, buffers = columns_touched(coffea_metrics)
    n_remote = sum(remote.is_remote(f.path) for s in cat for f in s.files)
    network = int(coffea_metrics.get("bytesread", 0)) if n_remote == cat.n_files else (0 if not n_remote else None)
    return write_outputs(
        total, output, ml=ml, started=wall0, samples=weights, rows=dict(total.skimmed),
        files=cat.n_files, bytes_read=int(coffea_metrics.get("bytesread", 0)), columns=columns,
        executor=executor, workers=workers,
        extra={"input": str(cat.source), "scheduler": scheduler, "chunksize": chunksize or DIRECT_CHUNKSIZE,
               "nevts_per_sample": {s.name: s.nevts_total for s in cat}, "columns_read": branches,
               "buffers_read": buffers, "bytes_read_network": network},
        pipeline="direct", stages=stage.stages, io_only=io_only,
    )


def write_outputs(
    total: ChunkResult, output: Path, *, ml: bool, started: float, samples: Mapping[str, tuple[str, str, float]],
    rows: Mapping[str, int], files: int, bytes_read: int, columns: list[str], executor: str, workers: int,
    extra: Mapping[str, Any] | None = None, pipeline: str = "deliver+process",
    stages: Mapping[str, Mapping[str, float]] | None = None, io_only: bool = False,
) -> RunResult:
    """Turn merged exact sums into histograms and write histograms.root, histograms_ml.root and metrics.json.

    ``started`` is the ``time.perf_counter()`` of the start of the run (for wall time and the event rate).
    With ``io_only`` only metrics.json is written (nothing was histogrammed). ``extra`` overrides any key.
    """
    output = Path(output)
    w0, c0 = time.perf_counter(), time.process_time()
    histograms: dict[str, hist.Hist] = {}
    ml_histograms: dict[str, hist.Hist] = {}
    if not io_only:
        histograms = _finalise(total.hists, REGIONS, "observable [GeV]")
        if ml:
            from .ml import FEATURE_NAMES

            ml_histograms = _finalise(total.ml_hists, FEATURE_NAMES, "feature")
    metrics_path = output.parent / METRICS_NAME
    ml_output = output.parent / ML_OUTPUT_NAME if ml and not io_only else None
    # histograms.root, histograms_ml.root and metrics.json are one result: replaced together or not at all
    # (an --io-only run replaces only metrics.json; a --no-ml run removes an older histograms_ml.root)
    members = [METRICS_NAME] if io_only else [output.name, ML_OUTPUT_NAME, METRICS_NAME]
    outputs = OutputSet(output.parent, members)
    if not io_only:
        write_root(outputs.path(output.name), histograms)
        if ml_output is not None:
            write_root(outputs.path(ML_OUTPUT_NAME), ml_histograms)
    all_stages = {k: dict(v) for k, v in (stages or {}).items()}
    all_stages.setdefault("process", {})["cpu_seconds_chunks"] = total.cpu_seconds
    all_stages["write"] = {"wall_seconds": time.perf_counter() - w0, "cpu_seconds_driver": time.process_time() - c0}
    wall = time.perf_counter() - started
    n_events = sum(total.events.values())
    skimmed = total.skimmed or total.events
    metrics: dict[str, Any] = {
        "pipeline": pipeline,
        "mode": "io-only" if io_only else "analysis",
        "output": None if io_only else str(output),
        "ml_output": str(ml_output) if ml_output else None,
        "executor": executor,
        "workers": workers,
        "chunks": total.chunks,
        "files": files,
        "events_read": n_events,
        "events_per_sample": dict(sorted(total.events.items())),
        "events_after_skim": sum(skimmed.values()),
        "events_after_skim_per_sample": dict(sorted(skimmed.items())),
        "rows_per_sample": dict(sorted(rows.items())),
        "events_per_region": {
            region: sum(r.get(region, 0) for r in total.region_events.values()) for region in REGIONS
        },
        "events_per_sample_region": dict(sorted(total.region_events.items())),
        "bytes_read": bytes_read,
        "bytes_materialised": total.bytes_read if io_only else None,
        "columns": columns,
        "wall_seconds": wall,
        "cpu_seconds_processing": total.cpu_seconds,
        "cpu_seconds_driver": time.process_time(),
        "event_rate_hz": n_events / wall if wall > 0 else None,
        "stages": all_stages,
        "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "histograms": len(histograms),
        "ml_histograms": len(ml_histograms),
        "ttbar_alternatives": [v for v in TTBAR_ALTERNATIVES if any(s[1] == v for s in samples.values())],
        "versions": _versions(),
        "host": {"cpus": os.cpu_count(), "platform": sys.platform},
        **dict(extra or {}),
    }
    try:
        outputs.path(METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    return RunResult(histograms, ml_histograms, metrics, output, ml_output, metrics_path)


__all__ = [
    "AGCProcessor",
    "ChunkResult",
    "ManifestError",
    "ProcessError",
    "RunResult",
    "SchemaError",
    "analyse_events",
    "analyse_file",
    "check_models",
    "columns_touched",
    "needed_columns",
    "read_columns",
    "resolve_models_dir",
    "run_direct",
    "run_processor",
    "write_outputs",
]
