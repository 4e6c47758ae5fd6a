"""Streaming pipeline (``agc-sx run``): process every delivered file as soon as it has landed and been verified.

The delivery (local or ServiceX backend, unchanged) runs in a thread and records each verified output in
``manifest.json``; this module watches the manifest and sends every new file to a pool of processor workers
beside the downloads. Each finished file is added to the running histograms, and the histograms together with
the list of accumulated files are checkpointed in *one* atomic write, so a run that is killed and restarted
resumes without processing any file twice: a file is either in the checkpoint with its contribution, or in
neither.

Weights need ``nevts_total`` before the first file is processed. It is known up front: the unskimmed
``nevts`` of the input files asked for. A sample that does not come back complete is therefore an error (the
checkpoint is kept, so re-running fetches and processes only what is missing).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .catalogue import Catalog
from .delivery import deliver
from .delivery.common import DeliveryError, DeliveryReport, open_delivery
from .errors import StreamError
from .manifest import Manifest, ManifestError, OutputFile, contained
from .options import BACKENDS, one_of
from .processor import (
    ChunkResult,
    RunInfo,
    RunResult,
    analyse_file,
    check_models,
    parquet_column_bytes,
    resolve_models_dir,
    write_outputs,
)
from .query import query_text
from .schema import check_parquet_schema, needed_columns
from .utils import atomic_write_text, sha256_text

CHECKPOINT_NAME = ".agc-sx-stream.json"
CHECKPOINT_FORMAT = "agc-sx streaming checkpoint"
CHECKPOINT_VERSION = 2
_SHA256 = re.compile(r"[0-9a-f]{64}")



@dataclass
class _Checkpoint:
    """What has been accumulated so far, written atomically as one JSON document (data only, never code).

    ``key`` ties it to its run (catalogue samples and files, query, BDT models and options): a checkpoint of
    another run, or one that does not validate, is not used.
    """

    key: str
    accumulated: dict[str, str] = field(default_factory=dict)  # output file (relative) -> sha256
    result: ChunkResult = field(default_factory=ChunkResult)

    def save(self, path: Path) -> None:
        doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "key": self.key,
               "accumulated": self.accumulated, "result": self.result.to_json()}
        atomic_write_text(path, json.dumps(doc, sort_keys=True))

    @classmethod
    def load(cls, path: Path, key: str) -> tuple[_Checkpoint | None, str | None]:
        """(the checkpoint at ``path`` if it is valid and of this run, else None; why it is not used)."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as err:
            return None, f"checkpoint {path} is unreadable ({type(err).__name__}): starting afresh"
        try:
            if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not an agc-sx checkpoint")
            if doc.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"format version {doc.get('version')!r}")
            if doc.get("key") != key:
                return None, (f"checkpoint {path} belongs to another run (catalogue, query, models or options "
                              "differ): starting afresh")
            accumulated = doc.get("accumulated")
            if not (isinstance(accumulated, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                    for k, v in accumulated.items())):
                raise ValueError("bad list of accumulated files")
            return cls(key, dict(accumulated), ChunkResult.from_json(doc.get("result"))), None
        except ValueError as err:
            return None, f"checkpoint {path} is not valid ({err}): starting afresh"


@dataclass
class _Job:
    sample: str
    process: str
    variation: str
    weight: float
    inputs: frozenset[str]


def _configuration_key(jobs: dict[str, _Job], query_sha: str, ml: bool, models: str | None) -> str:
    """Everything that changes the content of the histograms; a checkpoint of another configuration is unused."""
    doc = {
        "query": query_sha,
        "ml": ml,
        "models": models,
        "samples": {n: [j.process, j.variation, repr(j.weight), sorted(j.inputs)] for n, j in sorted(jobs.items())},
    }
    return sha256_text(json.dumps(doc, sort_keys=True))


def _models_fingerprint(models_dir: Path | None) -> str:
    from .ml import MODEL_EVEN, MODEL_ODD

    directory = resolve_models_dir(models_dir)
    parts = []
    for name in (MODEL_EVEN, MODEL_ODD):
        p = directory / name
        parts.append(sha256_text(p.read_text()) if p.exists() else "missing")
    return sha256_text("".join(parts))


def _start_delivery(backend: str, catalog: Catalog, output_dir: Path, *, workers: int, force: bool,
                    servicex: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run the delivery in a thread; its report (or exception) lands in the returned dict."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["report"] = deliver(catalog, output_dir, backend=backend, workers=workers, force=force,
                                        quiet=True, servicex=servicex)
        except BaseException as err:  # handed to the main thread, which reports it
            outcome["error"] = err
        finally:
            outcome["end"] = time.time()

    thread = threading.Thread(target=target, name="agc-sx-delivery", daemon=True)
    thread.start()
    return thread, outcome


def _timed_analyse(path: str, process: str, variation: str, weight: float, ml: bool, models_dir: Path | None,
                   sample: str) -> tuple[ChunkResult, float, float]:
    """Process one file in a worker; wall-clock start and end (comparable across processes) come back too."""
    start = time.time()
    result = analyse_file(path, process, variation, weight, ml=ml, models_dir=models_dir, sample=sample)
    return result, start, time.time()


def _overlap(busy: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of the processing intervals ``busy`` that fall inside [start, end]."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in busy)


def run_streaming(
    catalog: Catalog,
    output_dir: Path,
    *,
    backend: str = "servicex",
    output: Path = Path("histograms.root"),
    workers: int = 1,
    ml: bool = True,
    models_dir: Path | None = None,
    force: bool = False,
    quiet: bool = False,
    poll_interval: float = 0.2,
    servicex: dict[str, Any] | None = None,
    on_accumulated: Callable[[str], None] | None = None,
) -> RunResult:
    """Deliver ``catalog`` into ``output_dir`` and process each file while the rest is still being delivered.

    The result equals ``deliver`` followed by ``process`` on the same inputs.

    Args:
        catalog: the samples to deliver and process.
        output_dir: the delivery folder; the checkpoint lives there too.
        backend: one of :data:`agc_sx.options.BACKENDS`.
        output: path of histograms.root (histograms_ml.root and metrics.json go beside it).
        workers: processor worker processes (and local-backend delivery workers).
        ml: fill the BDT observables.
        models_dir: the BDT models; default the bundled ones.
        force: ignore the checkpoint and redo every delivery.
        quiet: no progress bar, no notes.
        poll_interval: seconds between looks at the manifest.
        servicex: keyword options of the ServiceX backend.
        on_accumulated: called with the relative output path after each file's contribution is checkpointed.
    """
    if (problem := one_of("backend", backend, BACKENDS)) is not None:
        raise StreamError(problem)
    if workers < 1:
        raise StreamError("--workers must be at least 1")
    stream = _Stream(catalog, Path(output_dir), ml=ml, models_dir=models_dir, force=force, quiet=quiet,
                     on_accumulated=on_accumulated)
    delivery, outcome = _start_delivery(backend, catalog, stream.output_dir, workers=workers, force=force,
                                        servicex=servicex or {})
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver")) as pool:
            while delivery.is_alive():
                stream.scan(pool)
                stream.collect(poll_interval)
            stream.scan(pool)  # what landed between the last scan and the end of the delivery
            while stream.in_flight:
                stream.collect(poll_interval)
    finally:
        stream.progress.close()
    delivery.join()
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, (DeliveryError, ValueError, OSError)):
            raise StreamError(f"delivery failed: {err}") from None
        raise err
    return stream.finish(outcome["report"], outcome["end"], backend=backend, output=Path(output), workers=workers)


class _Stream:
    """The state of one streaming run: the checkpoint, the files in flight and what went wrong with any.

    :meth:`scan` sends every newly verified output to the pool, :meth:`collect` adds finished ones to the
    checkpoint, :meth:`finish` checks that everything was delivered and accumulated and writes the outputs.
    """

    def __init__(self, catalog: Catalog, output_dir: Path, *, ml: bool, models_dir: Path | None, force: bool,
                 quiet: bool, on_accumulated: Callable[[str], None] | None) -> None:
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        self.wall0, self.clock0 = time.perf_counter(), time.time()
        self.ml, self.models_dir, self.on_accumulated = ml, models_dir, on_accumulated
        if ml:
            check_models(models_dir)
        self.jobs = {s.name: _Job(s.name, s.process, s.variation, s.weight, frozenset(f.path for f in s.files))
                     for s in catalog}
        key = _configuration_key(self.jobs, sha256_text(query_text()), ml,
                                 _models_fingerprint(models_dir) if ml else None)
        self.checkpoint_path = output_dir / CHECKPOINT_NAME
        state, why = (None, None) if force else _Checkpoint.load(self.checkpoint_path, key)
        if why and not quiet:
            print(f"agc-sx: note: {why}", file=sys.stderr)
        self.resumed = state is not None and bool(state.accumulated)
        self.state = state or _Checkpoint(key)
        self.state.save(self.checkpoint_path)
        self.columns = needed_columns(ml)
        self.in_flight: dict[Future[tuple[ChunkResult, float, float]], OutputFile] = {}
        self.busy: list[tuple[float, float]] = []
        self.problems: dict[str, str] = {}
        self.progress = _Progress(sum(len(j.inputs) for j in self.jobs.values()), quiet)
        self.progress.update(len(self.state.accumulated))

    def scan(self, pool: ProcessPoolExecutor) -> None:
        """Submit every verified output of the manifest that is neither accumulated nor in flight."""
        try:
            manifest = Manifest.load(self.output_dir)
        except ManifestError:
            return  # not written yet
        accumulated = self.state.accumulated
        for name, job in self.jobs.items():
            record = manifest.samples.get(name)
            if record is None:
                continue
            for out in record.outputs:
                if out.input not in job.inputs:
                    continue
                if out.file in accumulated:
                    if accumulated[out.file] != out.sha256:
                        raise StreamError(f"{out.file} was delivered again with other content after it was "
                                          "accumulated; start afresh with --force")
                    continue
                if any(o.file == out.file for o in self.in_flight.values()):
                    continue
                problem = out.verify(self.output_dir)
                if problem is None:
                    try:
                        check_parquet_schema(contained(self.output_dir, out.file), self.columns)
                    except ValueError as err:
                        problem = str(err)
                if problem is not None:
                    self.problems[out.file] = problem  # may be re-delivered; checked again at the end
                    continue
                self.problems.pop(out.file, None)
                future = pool.submit(_timed_analyse, str(contained(self.output_dir, out.file)), job.process,
                                     job.variation, job.weight, self.ml, self.models_dir, name)
                self.in_flight[future] = out

    def collect(self, timeout: float) -> None:
        """Add the files finished within ``timeout`` seconds to the checkpoint, one atomic write each."""
        if not self.in_flight:
            time.sleep(timeout)
            return
        done, _ = wait(list(self.in_flight), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            out = self.in_flight.pop(future)
            try:
                result, started, ended = future.result()
            except Exception:
                # a backend may withdraw a stored file when its sample fails afterwards: not an error here,
                # the file is simply not accumulated; anything else ends the run (the checkpoint keeps the rest)
                if out.verify(self.output_dir) is not None:
                    self.problems[out.file] = "withdrawn by the delivery before it was processed"
                    continue
                raise
            self.busy.append((started, ended))
            self.state.result += result
            self.state.accumulated[out.file] = out.sha256
            self.state.save(self.checkpoint_path)
            self.progress.update(len(self.state.accumulated))
            if self.on_accumulated is not None:
                self.on_accumulated(out.file)

    def finish(self, report: DeliveryReport, delivery_end: float, *, backend: str, output: Path,
               workers: int) -> RunResult:
        """Refuse an incomplete run (one line per missing file), else write the outputs and note them."""
        accumulated = self.state.accumulated
        missing = []
        for name, job in self.jobs.items():
            outputs = [o for o in report.manifest.samples[name].outputs if o.input in job.inputs]
            delivered = {o.input for o in outputs}
            missing += [f"{name}: {path}: not delivered" for path in sorted(job.inputs - delivered)]
            missing += [f"{name}: {o.file}: not accumulated" for o in outputs if o.file not in accumulated]
        if missing or not report.ok:
            lines = report.failures or missing
            lines += [f"{file}: {why}" for file, why in sorted(self.problems.items())]
            raise StreamError(
                "incomplete, the histograms are not written (re-run to fetch and process only what is missing):\n"
                + "\n".join(lines)
            )
        processing_seconds = sum(b - a for a, b in self.busy)
        overlap = _overlap(self.busy, self.clock0, delivery_end)
        info = RunInfo(
            pipeline=f"streaming ({backend})", input=str(self.output_dir.resolve()),
            samples={name: (job.process, job.variation, job.weight) for name, job in self.jobs.items()},
            rows={name: report.manifest.samples[name].rows for name in self.jobs}, files=len(accumulated),
            # the same measure as agc-sx process: compressed bytes of the columns read
            bytes_read=sum(parquet_column_bytes(contained(self.output_dir, f), self.columns) for f in accumulated),
            columns=self.columns, executor="streaming", workers=workers, started=self.wall0, ml=self.ml,
            extra={
                "backend": backend,
                "resumed_from_checkpoint": self.resumed,
                "files_accumulated": len(accumulated),
                "files_processed_this_run": len(self.busy),
                "delivery_wall_seconds": delivery_end - self.clock0,
                "processing_seconds": processing_seconds,
                "processing_overlapping_delivery_seconds": overlap,
                "overlap_fraction": overlap / processing_seconds if processing_seconds > 0 else None,
                # what the local delivery read from remote inputs (root://, https://) in this run
                "bytes_read_network": report.bytes_read if backend == "local" else None,
            },
        )
        result = write_outputs(self.state.result, output, info)
        with open_delivery(self.output_dir, None, None) as manifest:
            manifest.extra["stream"] = {
                "checkpoint": CHECKPOINT_NAME,
                "accumulated": sorted(accumulated),
                "output": str(output.resolve()),
            }
            manifest.save()
        return result


class _Progress:
    """A rich bar of files accumulated, or nothing with ``quiet``."""

    def __init__(self, total: int, quiet: bool) -> None:
        self._bar: Any = None
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("deliver + process"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn())
            self._task = self._bar.add_task("files", total=total)
            self._bar.start()

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


__all__ = ["CHECKPOINT_NAME", "StreamError", "run_streaming"]
