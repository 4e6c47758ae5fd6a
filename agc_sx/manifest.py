"""The delivery output layout and its ``manifest.json``, shared by every backend and read by the processor.

Layout::

    DIR/manifest.json
    DIR/<process>__<variation>/<input-file-stem>.parquet

The manifest says what was asked (query text and hash, input files with their unskimmed ``nevts``), what came
back (output files with rows, bytes, sha256) and what normalisation needs (``xsec``, ``nevts_total`` summed over
the *delivered* inputs). It is rewritten atomically after every file, so a run that dies leaves a consistent
record of what is finished.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from .errors import ManifestError
from .utils import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

Status = Literal["complete", "incomplete", "pending"]



def now() -> str:
    """Local time with its offset, as the manifest records times."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]")


def safe_component(name: str) -> str:
    """Make ``name`` a single harmless path component (no separators, no ``..``, no leading dot)."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".")
    cleaned = cleaned.replace("..", "_")
    return cleaned or "_"


def sample_dirname(process: str, variation: str) -> str:
    """Folder of one sample: the AGC fileset key ``process__variation``, sanitised."""
    return safe_component(f"{process}__{variation}")


def output_filename(input_path: str) -> str:
    """Parquet name for one input file: the input's stem, sanitised (``.../x_0001.root`` -> ``x_0001.parquet``)."""
    stem = PurePosixPath(input_path.split("?", 1)[0].rstrip("/")).name
    if stem.endswith(".root"):
        stem = stem[: -len(".root")]
    return safe_component(stem) + ".parquet"


def contained(base: Path, relative: str) -> Path:
    """Resolve ``base / relative`` and refuse anything that escapes ``base``."""
    target = (base / relative).resolve()
    if not target.is_relative_to(base.resolve()):
        raise ManifestError(f"refusing path outside the output folder: {relative}")
    return target


@dataclass
class OutputFile:
    """One delivered parquet file, relative to the delivery folder."""

    file: str
    input: str
    nevts_input: int
    rows: int
    bytes: int
    sha256: str
    query_sha256: str
    created: str = field(default_factory=now)

    def verify(self, base: Path) -> str | None:
        """None when the file on disk matches this record, else why not."""
        path = contained(base, self.file)
        if not path.exists():
            return f"{self.file} is missing"
        if path.stat().st_size != self.bytes:
            return f"{self.file} has {path.stat().st_size} bytes, the manifest says {self.bytes}"
        if sha256_file(path) != self.sha256:
            return f"{self.file} checksum mismatch"
        return None


@dataclass
class FailedInput:
    """An input that was asked for and not delivered, with the first line of why."""
    path: str
    nevts: int
    error: str


@dataclass
class SampleRecord:
    """Everything delivered (or not) for one ``process__variation``."""

    process: str
    variation: str
    xsec: float
    backend: str
    inputs: list[dict[str, Any]]  # [{"path", "nevts"}] as asked for
    outputs: list[OutputFile] = field(default_factory=list)
    failed: list[FailedInput] = field(default_factory=list)
    status: Status = "pending"
    started: str = field(default_factory=now)
    finished: str | None = None

    @property
    def name(self) -> str:
        """The fileset key ``process__variation``."""
        return f"{self.process}__{self.variation}"

    @property
    def dirname(self) -> str:
        """The sample's folder inside the delivery folder."""
        return sample_dirname(self.process, self.variation)

    @property
    def nevts_total(self) -> int:
        """Unskimmed event count of the inputs that were delivered: the normalisation denominator."""
        return sum(o.nevts_input for o in self.outputs)

    @property
    def rows(self) -> int:
        """Events after the skim over all outputs."""
        return sum(o.rows for o in self.outputs)

    def output_for(self, input_path: str) -> OutputFile | None:
        """The output of ``input_path``, if it has one."""
        for o in self.outputs:
            if o.input == input_path:
                return o
        return None

    def set_output(self, out: OutputFile) -> None:
        """Record ``out`` as the output of its input (replacing an older one or a failure)."""
        self.outputs = [o for o in self.outputs if o.input != out.input] + [out]
        self.failed = [f for f in self.failed if f.path != out.input]

    def set_failed(self, path: str, nevts: int, error: str) -> None:
        """Record that ``path`` failed (replacing its output, if any)."""
        self.outputs = [o for o in self.outputs if o.input != path]
        self.failed = [f for f in self.failed if f.path != path] + [FailedInput(path, nevts, error)]

    def finish(self) -> None:
        """Set the status from what came back: complete only when every asked input has a verified output."""
        delivered = {o.input for o in self.outputs}
        missing = [i for i in self.inputs if i["path"] not in delivered]
        for i in missing:
            if not any(f.path == i["path"] for f in self.failed):
                self.failed.append(FailedInput(i["path"], int(i["nevts"]), "not delivered"))
        self.status = "complete" if not missing else "incomplete"
        self.finished = now()

    def to_json(self) -> dict[str, Any]:
        """The record as ``manifest.json`` stores it (with the derived totals)."""
        d = asdict(self)
        d["nevts_total"] = self.nevts_total
        d["rows"] = self.rows
        d["outputs"] = sorted(d["outputs"], key=lambda o: o["file"])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SampleRecord:
        """The inverse of :meth:`to_json`."""
        return cls(
            process=d["process"],
            variation=d["variation"],
            xsec=float(d["xsec"]),
            backend=d["backend"],
            inputs=list(d["inputs"]),
            outputs=[OutputFile(**o) for o in d.get("outputs", [])],
            failed=[FailedInput(**f) for f in d.get("failed", [])],
            status=d.get("status", "pending"),
            started=d.get("started", now()),
            finished=d.get("finished"),
        )


@dataclass
class Manifest:
    """The whole delivery folder's record. Save it after every change; saving is atomic."""

    base: Path
    query: str = ""
    query_sha256: str = ""
    samples: dict[str, SampleRecord] = field(default_factory=dict)
    created: str = field(default_factory=now)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The ``manifest.json`` of the folder."""
        return self.base / MANIFEST_NAME

    def __iter__(self) -> Iterator[SampleRecord]:
        return iter(self.samples.values())

    def save(self) -> None:
        """Write ``manifest.json`` atomically."""
        doc = {
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "updated": now(),
            "query": {"text": self.query, "sha256": self.query_sha256},
            "samples": {name: rec.to_json() for name, rec in self.samples.items()},
            **({"extra": self.extra} if self.extra else {}),
        }
        atomic_write_text(self.path, json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, base: str | Path) -> Manifest:
        """Read the manifest of the delivery folder ``base``; ManifestError if there is none or it is damaged."""
        base = Path(base)
        path = base / MANIFEST_NAME
        if not base.is_dir():
            raise ManifestError(f"{base} is not a folder")
        if not path.exists():
            raise ManifestError(f"{base} has no {MANIFEST_NAME}: deliver into it first (agc-sx deliver)")
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise TypeError(f"a JSON {type(doc).__name__}, not an object")
            query = doc.get("query", {})
            samples = {n: SampleRecord.from_json(r) for n, r in doc["samples"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"{path} is not a valid agc-sx manifest ({type(err).__name__}: {err})") from None
        return cls(
            base,
            query.get("text", ""),
            query.get("sha256", ""),
            samples,
            doc.get("created", now()),
            doc.get("extra", {}),
        )

    @classmethod
    def open_or_create(cls, base: str | Path) -> Manifest:
        """The manifest of ``base``, or a new empty one (the folder is created)."""
        base = Path(base)
        if (base / MANIFEST_NAME).exists():
            return cls.load(base)
        base.mkdir(parents=True, exist_ok=True)
        return cls(base)
