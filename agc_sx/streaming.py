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
from .delivery.common import DeliveryError, DeliveryReport, open_delivery
from .errors import AgcSxError
from .manifest import Manifest, ManifestError, OutputFile, contained
from .processor import (
    ChunkResult,
    RunResult,
    analyse_file,
    check_models,
    parquet_column_bytes,
    resolve_models_dir,
    write_outputs,
)
from .query import query_hash, query_text
from .schema import check_parquet_schema, needed_columns
from .utils import atomic_write_text, sha256_text

CHECKPOINT_NAME = ".agc-sx-stream.json"
CHECKPOINT_FORMAT = "agc-sx streaming checkpoint"
CHECKPOINT_VERSION = 2
_SHA256 = re.compile(r"[0-9a-f]{64}")


class StreamError(AgcSxError, RuntimeError):
    """A streaming run that could not produce complete histograms; the message is one line per problem."""


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
    directory = resolve_models_dir(models_dir)
    parts = []
    for name in ("model_even.json", "model_odd.json"):
        p = directory / name
        parts.append(sha256_text(p.read_text()) if p.exists() else "missing")
    return sha256_text("".join(parts))


def _start_delivery(backend: str, catalog: Catalog, output_dir: Path, *, workers: int, force: bool,
                    servicex: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run the delivery in a thread; its report (or exception) lands in the returned dict."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            if backend == "local":
                from .delivery.local import deliver_local

                outcome["report"] = deliver_local(catalog, output_dir, workers=workers, force=force, quiet=True)
            else:
                from .delivery.servicex_backend import deliver_servicex

                outcome["report"] = deliver_servicex(catalog, output_dir, force=force, quiet=True, **servicex)
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

    The result equals ``deliver`` followed by ``process`` on the same inputs. ``on_accumulated`` is called with
    the relative output path after each file's contribution has been checkpointed.
    """
    if backend not in ("servicex", "local"):
        raise StreamError(f"unknown backend {backend!r} (choose servicex or local)")
    if workers < 1:
        raise StreamError("--workers must be at least 1")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wall0, clock0 = time.perf_counter(), time.time()
    if ml:
        check_models(models_dir)

    jobs = {s.name: _Job(s.name, s.process, s.variation, s.weight, frozenset(f.path for f in s.files))
            for s in catalog}
    for job in jobs.values():
        if job.weight == 0.0:
            raise StreamError(f"sample {job.sample} has no input events to normalise to")
    query_sha = query_hash(query_text())
    key = _configuration_key(jobs, query_sha, ml, _models_fingerprint(models_dir) if ml else None)
    checkpoint_path = output_dir / CHECKPOINT_NAME
    state, why = (None, None) if force else _Checkpoint.load(checkpoint_path, key)
    if why and not quiet:
        print(f"agc-sx: note: {why}", file=sys.stderr)
    resumed = state is not None and bool(state.accumulated)
    state = state or _Checkpoint(key)
    state.save(checkpoint_path)
    columns = needed_columns(ml)

    delivery, outcome = _start_delivery(backend, catalog, output_dir, workers=workers, force=force,
                                        servicex=servicex or {})
    in_flight: dict[Future[tuple[ChunkResult, float, float]], OutputFile] = {}
    busy: list[tuple[float, float]] = []
    problems: dict[str, str] = {}
    total_files = sum(len(j.inputs) for j in jobs.values())
    progress = _Progress(total_files, quiet)
    progress.update(len(state.accumulated))

    def scan(pool: ProcessPoolExecutor) -> None:
        try:
            manifest = Manifest.load(output_dir)
        except ManifestError:
            return  # not written yet
        for name, job in jobs.items():
            record = manifest.samples.get(name)
            if record is None:
                continue
            for out in record.outputs:
                if out.input not in job.inputs:
                    continue
                if out.file in state.accumulated:
                    if state.accumulated[out.file] != out.sha256:
                        raise StreamError(f"{out.file} was delivered again with other content after it was "
                                          "accumulated; start afresh with --force")
                    continue
                if any(o.file == out.file for o in in_flight.values()):
                    continue
                problem = out.verify(output_dir)
                if problem is None:
                    try:
                        check_parquet_schema(contained(output_dir, out.file), columns)
                    except ValueError as err:
                        problem = str(err)
                if problem is not None:
                    problems[out.file] = problem  # may be re-delivered; checked again at the end
                    continue
                problems.pop(out.file, None)
                in_flight[pool.submit(_timed_analyse, str(contained(output_dir, out.file)), job.process,
                                      job.variation, job.weight, ml, models_dir, name)] = out

    def collect(timeout: float) -> None:
        if not in_flight:
            time.sleep(timeout)
            return
        done, _ = wait(list(in_flight), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            out = in_flight.pop(future)
            try:
                result, started, ended = future.result()
            except Exception:
                # a backend may withdraw a stored file when its sample fails afterwards: not an error here,
                # the file is simply not accumulated; anything else ends the run (the checkpoint keeps the rest)
                if out.verify(output_dir) is not None:
                    problems[out.file] = "withdrawn by the delivery before it was processed"
                    continue
                raise
            busy.append((started, ended))
            state.result += result
            state.accumulated[out.file] = out.sha256
            state.save(checkpoint_path)
            progress.update(len(state.accumulated))
            if on_accumulated is not None:
                on_accumulated(out.file)

    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("forkserver")) as pool:
            while delivery.is_alive():
                scan(pool)
                collect(poll_interval)
            scan(pool)  # what landed between the last scan and the end of the delivery
            while in_flight:
                collect(poll_interval)
    finally:
        progress.close()
    delivery.join()
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, (DeliveryError, ValueError, OSError)):
            raise StreamError(f"delivery failed: {err}") from None
        raise err

    report: DeliveryReport = outcome["report"]
    missing = []
    for name, job in jobs.items():
        outputs = [o for o in report.manifest.samples[name].outputs if o.input in job.inputs]
        delivered = {o.input for o in outputs}
        missing += [f"{name}: {path}: not delivered" for path in sorted(job.inputs - delivered)]
        missing += [f"{name}: {o.file}: not accumulated" for o in outputs if o.file not in state.accumulated]
    if missing or not report.ok:
        lines = report.failures or missing
        lines += [f"{file}: {why}" for file, why in sorted(problems.items())]
        raise StreamError(
            "incomplete, the histograms are not written (re-run to fetch and process only what is missing):\n"
            + "\n".join(lines)
        )

    delivery_seconds = outcome["end"] - clock0
    processing_seconds = sum(b - a for a, b in busy)
    overlap = _overlap(busy, clock0, outcome["end"])
    stream_metrics = {
        "pipeline": f"streaming ({backend})",
        "backend": backend,
        "resumed_from_checkpoint": resumed,
        "files_accumulated": len(state.accumulated),
        "files_processed_this_run": len(busy),
        "delivery_wall_seconds": delivery_seconds,
        "processing_seconds": processing_seconds,
        "processing_overlapping_delivery_seconds": overlap,
        "overlap_fraction": overlap / processing_seconds if processing_seconds > 0 else None,
        # what the local delivery read from remote inputs (root://, https://) in this run
        "bytes_read_network": report.bytes_read if backend == "local" else None,
    }
    samples = {name: (job.process, job.variation, job.weight) for name, job in jobs.items()}
    rows = {name: report.manifest.samples[name].rows for name in jobs}
    # the same measure as agc-sx process: compressed bytes of the columns read
    bytes_read = sum(parquet_column_bytes(contained(output_dir, f), columns) for f in state.accumulated)
    result = write_outputs(
        state.result, output, ml=ml, started=wall0, samples=samples, rows=rows, files=len(state.accumulated),
        bytes_read=bytes_read, columns=columns, executor="streaming", workers=workers,
        extra={"input": str(output_dir.resolve()), **stream_metrics},
    )
    with open_delivery(output_dir, None, None) as manifest:
        manifest.extra["stream"] = {
            "checkpoint": CHECKPOINT_NAME,
            "accumulated": sorted(state.accumulated),
            "output": str(Path(output).resolve()),
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
