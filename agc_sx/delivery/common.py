"""What every delivery backend shares: the folder lock, the plan of what to (re)do, and storing one output.

A backend's loop is::

    with open_delivery(output_dir, text, sha) as manifest:          # lock, clean *.part, record the query
        for sample in catalog:
            todo = plan(manifest, sample, sha, force, backend="...")   # what is missing, corrupt or stale
            for input_file in todo.todo:
                ...produce an ak.Array or a parquet file for input_file...
                store_output(manifest, todo, input_file, result, query_sha256=sha)
                # or, on an error: record_failure(manifest, todo, input_file, err)
            finish_sample(manifest, todo)
        return DeliveryReport.from_manifest(manifest, [s.name for s in catalog])

Only :func:`store_output` gives an output its final name, after it has been read back and checked, and the
manifest is saved right after. A run that is killed therefore leaves at most ``*.part`` files (removed by the
next run) and a manifest that lists only verified outputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow.parquet as pq

from ..catalogue import Catalog, InputFile, Sample
from ..errors import DeliveryError
from ..manifest import (
    Manifest,
    ManifestError,
    OutputFile,
    SampleRecord,
    contained,
    output_filename,
    sample_dirname,
)
from ..query import OUTPUT_COLUMN_NAMES, column_types, empty_skim, schema_problems
from ..schema import parquet_column_types
from ..utils import PARTIAL_SUFFIX, atomic_path, first_line, sha256_file

LOCK_NAME = ".agc-sx-deliver.lock"



@dataclass(frozen=True)
class Job:
    """One sample to deliver by a server: the sample (its files or dataset ids) and the qastle to run."""

    sample: Sample
    qastle: str
    dataset_type: str = "filelist"  # one of agc_sx.options.DATASET_TYPES


# --- the report ------------------------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    """Outcome of one ``deliver`` call: the saved manifest and one line per input that is not delivered."""

    manifest: Manifest
    samples: list[str]
    failures: list[str] = field(default_factory=list)
    delivered: int = 0  # outputs written by this run
    reused: int = 0  # outputs kept from an earlier run
    bytes_read: int = 0  # input bytes this run read (over the network for remote inputs; local backend)

    @property
    def ok(self) -> bool:
        """Every sample complete and no input failed."""
        return not self.failures and all(
            self.manifest.samples[name].status == "complete" for name in self.samples
        )

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, samples: Iterable[str], delivered: int = 0, reused: int = 0
    ) -> DeliveryReport:
        """Collect the failures of the named samples from the manifest, one line each."""
        names = list(samples)
        failures = []
        for name in names:
            record = manifest.samples[name]
            for f in sorted(record.failed, key=lambda f: f.path):
                failures.append(f"{name}: {f.path}: {f.error}")
        return cls(manifest, names, failures, delivered, reused)

    def summary(self) -> str:
        """One line for people: status, outputs, events after the skim and unskimmed events."""
        records = [self.manifest.samples[n] for n in self.samples]
        n_out = sum(len(r.outputs) for r in records)
        rows = sum(r.rows for r in records)
        nevts = sum(r.nevts_total for r in records)
        incomplete = [r.name for r in records if r.status != "complete"]
        state = "complete" if not incomplete else f"INCOMPLETE ({', '.join(incomplete)})"
        return (
            f"{len(records)} samples {state}: {n_out} files ({self.delivered} new, {self.reused} reused), "
            f"{rows:,} of {nevts:,} events kept, in {self.manifest.base}"
        )


# --- starting a delivery ---------------------------------------------------------------------------------------


def clean_partials(base: Path) -> list[Path]:
    """Remove ``*.part`` files left by a killed run (in the folder and the sample folders), return them."""
    removed = []
    for pattern in (f"*{PARTIAL_SUFFIX}", f".*{PARTIAL_SUFFIX}", f"*/*{PARTIAL_SUFFIX}", f"*/.*{PARTIAL_SUFFIX}"):
        for p in base.glob(pattern):
            if p.is_file():
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def open_delivery(output_dir: Path, query: str | None, query_sha256: str | None) -> Iterator[Manifest]:
    """Lock ``output_dir`` for this process, clean partial files, record the query; yield the manifest.

    The lock makes a second ``deliver`` into the same folder fail at once instead of both writing it.
    ``query=None`` (per-sample queries, e.g. a databinder config) leaves the recorded query alone.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeliveryError(f"cannot create output folder {output_dir}: {err.strerror or err}") from None
    with open(output_dir / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DeliveryError(f"another agc-sx deliver is writing into {output_dir}") from None
        try:
            try:
                manifest = Manifest.open_or_create(output_dir)
            except ManifestError as err:
                raise DeliveryError(str(err)) from None
            clean_partials(output_dir)
            if query is not None and query_sha256 is not None:
                set_query(manifest, query, query_sha256)
            manifest.save()
            yield manifest
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def set_query(manifest: Manifest, query: str, query_sha256: str) -> None:
    """Record the query of this run; samples delivered with another query are marked incomplete, not reused."""
    manifest.query = query
    manifest.query_sha256 = query_sha256
    for record in manifest:
        stale = [o for o in record.outputs if o.query_sha256 != query_sha256]
        for o in stale:
            record.set_failed(o.input, o.nevts_input, "delivered with another query; deliver again")
        if stale:
            record.status = "incomplete"


def check_dirnames(catalog: Catalog) -> None:
    """Refuse two samples whose names sanitise to the same folder (they would overwrite each other)."""
    seen: dict[str, str] = {}
    for s in catalog:
        d = sample_dirname(s.process, s.variation)
        if d in seen and seen[d] != s.name:
            raise DeliveryError(f"samples {seen[d]} and {s.name} would share the output folder {d}")
        seen[d] = s.name


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """Output file name per input of one sample; inputs with the same stem get a short hash of their path."""
    plain = {p: output_filename(p) for p in paths}
    counts: dict[str, int] = {}
    for name in plain.values():
        counts[name] = counts.get(name, 0) + 1
    names = {}
    for p, name in plain.items():
        if counts[name] > 1:
            tag = hashlib.sha256(p.encode()).hexdigest()[:8]
            name = f"{name.removesuffix('.parquet')}-{tag}.parquet"
        names[p] = name
    return names


# --- planning --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """For one sample: its manifest record, inputs already delivered, inputs to (re)do and their file names."""

    record: SampleRecord
    done: list[InputFile]
    todo: list[InputFile]
    names: dict[str, str]  # input path -> output path relative to the delivery folder

    def target(self, base: Path, input_file: InputFile) -> Path:
        """Absolute final path of the output of ``input_file``, guaranteed inside ``base``."""
        return contained(base, self.names[input_file.path])


def plan(
    manifest: Manifest,
    sample: Sample,
    query_sha256: str,
    force: bool = False,
    backend: str = "local",
    *,
    datasets: bool = False,
) -> Plan:
    """Decide which inputs of ``sample`` are done and which must be (re)done; update its manifest record.

    Done means: an output recorded for the same input path, ``nevts`` and query hash whose file still has the
    recorded size and sha256. Missing, corrupt, stale (other query) outputs and everything under ``force``
    are redone. Outputs of earlier runs for inputs not asked for now are kept (a folder accumulates, a
    smaller ``--n-files`` does not throw work away) as long as they were made by the same query.

    ``datasets``: the inputs are dataset ids (a Rucio DID, a CERN Open Data record) that the server expands
    into files; a dataset is done when it has at least one output, all of them intact and of this query, and
    their ``nevts_input`` add up to its ``nevts``. The outputs of a dataset to redo are dropped from the
    record, since the new delivery replaces the whole set.
    """
    base = manifest.base
    record = manifest.samples.get(sample.name)
    asked = [{"path": f.path, "nevts": f.nevts} for f in sample.files]
    if record is None:
        record = SampleRecord(sample.process, sample.variation, sample.xsec, backend, asked)
        manifest.samples[sample.name] = record
    else:
        record.xsec = sample.xsec
        record.backend = backend
        asked_paths = {a["path"] for a in asked}
        kept = [
            o for o in record.outputs
            if o.input not in asked_paths and o.query_sha256 == query_sha256 and o.verify(base) is None
        ]
        record.outputs = [o for o in record.outputs if o.input in asked_paths] + kept
        record.failed = [f for f in record.failed if f.path in asked_paths]
        kept_paths = {o.input for o in kept}
        record.inputs = [i for i in record.inputs if i["path"] in kept_paths] + asked
    record.status = "pending"
    record.finished = None
    all_paths = [i["path"] for i in record.inputs]
    names = {p: f"{record.dirname}/{n}" for p, n in output_names(all_paths).items()}
    for rel in names.values():
        contained(base, rel)  # refuses anything that would escape the folder
    done: list[InputFile] = []
    todo: list[InputFile] = []
    for f in sample.files:
        if datasets:
            ok = not force and _dataset_done(record, f, query_sha256, base)
            if not ok:
                record.outputs = [o for o in record.outputs if o.input != f.path]
        else:
            existing = record.output_for(f.path)
            ok = (
                not force
                and existing is not None
                and existing.query_sha256 == query_sha256
                and existing.nevts_input == f.nevts
                and existing.file == names[f.path]
                and existing.verify(base) is None
            )
        (done if ok else todo).append(f)
    return Plan(record, done, todo, names)


def _dataset_done(record: SampleRecord, dataset: InputFile, query_sha256: str, base: Path) -> bool:
    """Every output of one dataset id intact, of this query, in the sample folder, and its nevts accounted once."""
    outs = [o for o in record.outputs if o.input == dataset.path]
    return (
        bool(outs)
        and sum(o.nevts_input for o in outs) == dataset.nevts
        and all(
            o.query_sha256 == query_sha256 and o.file.startswith(record.dirname + "/") and o.verify(base) is None
            for o in outs
        )
    )


# --- storing one output ----------------------------------------------------------------------------------------


def write_parquet(array: ak.Array, path: Path) -> ak.Array:
    """Write ``array`` as parquet at ``path`` (not atomic; see :func:`store_output`), flushed to disk.

    A zero-length result keeps its record type, so the file has every column; a zero-length array without
    fields (what some producers return for "nothing passed") is replaced by :func:`~agc_sx.query.empty_skim`.
    Returns the array written.
    """
    if len(array) == 0 and not array.fields:
        array = empty_skim()
    ak.to_parquet(array, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return array


def verify_written(path: Path, array: ak.Array) -> int:
    """Check a skim file this process has just written from ``array``; its row count, or DeliveryError.

    The same checks as :func:`verify_parquet` without reading the data back (a fifth of a local delivery's
    time): types, missing values and counters on the array in memory, and the file's footer - readable,
    the same physical types, as many rows - for what reached the disk.
    """
    problems = _skim_problems(column_types(array), array)
    if not problems:
        try:
            types, rows = parquet_column_types(path), pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow raises many unrelated types for damaged files
            raise DeliveryError(f"unreadable parquet ({type(err).__name__}: {first_line(err)})") from None
        problems = schema_problems(types)
        if not problems and rows != len(array):
            problems = [f"the file holds {rows} rows, {len(array)} were written"]
    if problems:
        raise DeliveryError("; ".join(problems))
    return len(array)


def verify_parquet(path: Path, expected_columns: Sequence[str] | None = OUTPUT_COLUMN_NAMES) -> int:
    """Read ``path`` back completely and check its columns; return its row count or raise DeliveryError.

    For the skim's columns (the default) types and counters are checked too, so a file that coffea's
    ``NanoAODSchema`` could not open never gets a final name. ``None`` checks only readability (a user's
    own query from a databinder-style config).
    """
    try:
        array = ak.from_parquet(path)
    except Exception as err:  # pyarrow raises many unrelated types for damaged files
        raise DeliveryError(f"unreadable parquet ({type(err).__name__}: {first_line(err)})") from None
    problems: list[str] = []
    if expected_columns is None:
        pass
    elif tuple(expected_columns) == OUTPUT_COLUMN_NAMES:
        # physical types from the footer: the real transformer's awkward extension types and plain pyarrow's
        # nullable fields are the same columns as ak.to_parquet's
        problems = _skim_problems(parquet_column_types(path), array)
    elif list(array.fields) != list(expected_columns):
        problems = [f"columns {', '.join(array.fields)}, expected {', '.join(expected_columns)}"]
    if problems:
        raise DeliveryError("; ".join(problems))
    return len(array)


def _skim_problems(types: dict[str, str], array: ak.Array) -> list[str]:
    """What makes a skim result unusable: its column types, missing values, counters (first kind found)."""
    return schema_problems(types) or missing_value_problems(array) or counter_problems(array)


def missing_value_problems(array: ak.Array) -> list[str]:
    """Columns that hold missing (null) values: NanoAOD has none, and the processor cannot cut on them."""
    problems = []
    for name in array.fields:
        column = array[name]
        if not _has_option(column.layout.form):
            continue  # no option type anywhere: nothing can be missing (and checking costs a full pass)
        holes = ak.is_none(column, axis=0)
        if column.ndim > 1:
            holes = holes | ak.any(ak.is_none(column, axis=1), axis=1)
        if ak.any(holes):
            problems.append(f"column {name} has missing values")
    return problems


def _has_option(form: Any) -> bool:
    """Whether an awkward form has an option type at any depth (only those can hold missing values)."""
    if form.is_option:
        return True
    children = getattr(form, "contents", None) or ([form.content] if hasattr(form, "content") else [])
    return any(_has_option(child) for child in children)


def counter_problems(array: ak.Array) -> list[str]:
    """Counters that differ from the lengths of their collection's columns (NanoAODSchema relies on them)."""
    from ..query import COUNTERS

    problems = []
    for collection, counter in COUNTERS.items():
        n = ak.to_numpy(array[counter]).astype("int64")
        for name in array.fields:
            if name.startswith(collection + "_") and not np.array_equal(_lengths(array[name]), n):
                problems.append(f"{counter} differs from the length of {name}")
    return problems


def _lengths(column: ak.Array) -> np.ndarray:
    """Per-event lengths of a jagged column: from its offsets when it has them (no pass over the data)."""
    layout = column.layout
    if isinstance(layout, ak.contents.ListOffsetArray):
        offsets = np.asarray(layout.offsets)
        return offsets[1:] - offsets[:-1]
    return ak.to_numpy(ak.num(column, axis=1))


def store_output(
    manifest: Manifest,
    plan: Plan,
    input_file: InputFile,
    source: ak.Array | Path,
    *,
    query_sha256: str,
    move: bool = False,
    expected_columns: Sequence[str] | None = OUTPUT_COLUMN_NAMES,
    name: str | None = None,
    nevts_input: int | None = None,
    verified: tuple[int, str] | None = None,
) -> OutputFile:
    """Put the output of ``input_file`` at its final place, verified, and record it in the saved manifest.

    ``source`` is the result array or a parquet file (moved when ``move``, else copied: e.g. out of the
    ServiceX client's cache). The final name is ``plan.names[input]`` (``<sample folder>/<input stem>.parquet``).
    The file is checked (readable, columns, counters) under a ``*.part`` name and only then renamed; on
    failure nothing is recorded and DeliveryError says why.

    ``name`` (relative to the folder, inside the sample folder) makes this one of *several* outputs of the
    input - the files a dataset id expands into - so the input's other outputs are kept; ``nevts_input``
    then says how many of the input's unskimmed events this output accounts for (the whole count on one
    output, 0 on the others, so ``nevts_total`` stays a plain sum).

    ``verified``: (rows, sha256) of the file ``source``, from a worker process that has just written it and run
    :func:`verify_parquet` on it (the local backend), so that it is moved without being read a second time.
    """
    base = manifest.base
    if name is not None and not name.startswith(plan.record.dirname + "/"):
        raise DeliveryError(f"output name {name} is outside the sample folder {plan.record.dirname}")
    rel = plan.names[input_file.path] if name is None else name
    target = contained(base, rel)
    with atomic_path(target) as tmp:
        if isinstance(source, ak.Array):
            write_parquet(source, tmp)
        else:
            src = Path(source)
            try:
                if move:
                    os.replace(src, tmp)
                else:
                    shutil.copyfile(src, tmp)
            except OSError as err:
                raise DeliveryError(f"cannot take over {src}: {err.strerror or err}") from None
            if verified is None and _is_empty_without_schema(tmp):
                write_parquet(empty_skim(), tmp)
        if verified is not None and not isinstance(source, ak.Array):
            rows, digest = verified
        else:
            rows, digest = verify_parquet(tmp, expected_columns), sha256_file(tmp)
        out = OutputFile(
            file=rel,
            input=input_file.path,
            nevts_input=input_file.nevts if nevts_input is None else nevts_input,
            rows=rows,
            bytes=tmp.stat().st_size,
            sha256=digest,
            query_sha256=query_sha256,
        )
    record = plan.record
    if name is None:
        record.set_output(out)
    else:
        record.outputs = [o for o in record.outputs if o.file != out.file] + [out]
        record.failed = [f for f in record.failed if f.path != out.input]
    manifest.save()
    return out


def _is_empty_without_schema(path: Path) -> bool:
    """A zero-byte file, or a parquet file with no rows and no columns (nothing passed, schema lost)."""
    if path.stat().st_size == 0:
        return True
    try:
        meta = ak.metadata_from_parquet(path)
    except Exception:
        return False
    return int(meta["num_rows"]) == 0 and not meta["form"].type.fields


def record_failure(manifest: Manifest, plan: Plan, input_file: InputFile, error: object) -> None:
    """Record that ``input_file`` was not delivered (first line of ``error``) and save the manifest."""
    plan.record.set_failed(input_file.path, input_file.nevts, first_line(error))
    manifest.save()


def finish_sample(manifest: Manifest, plan: Plan) -> None:
    """Set the sample's status from what is delivered, in a deterministic order, and save."""
    record = plan.record
    record.finish()
    record.failed.sort(key=lambda f: f.path)
    record.outputs.sort(key=lambda o: o.file)
    manifest.save()

