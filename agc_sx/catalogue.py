"""The sample catalogue (``ntuples.json``): loading, validation, import from the AGC format, filesets.

Format, a superset of the AGC ``nanoaod_inputs.json``::

    {process: {variation: {"nevts_total": int, "xsec": float (optional),
                           "files": [{"path": str, "nevts": int}, ...]}}}

Normalisation always uses the *unskimmed* ``nevts`` of the files actually processed, so a fileset restricted to
the first N files carries ``nevts_total`` summed over exactly those files.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import LUMI_PB, XSEC_PB
from .errors import CatalogError
from .utils import atomic_write_text


def event_weight(xsec: float, nevts_total: int) -> float:
    """Per-event normalisation ``xsec * lumi / nevts_total`` (pb x /pb / events; the AGC's order of operations).

    The one definition of the sample weight: every pipeline weights a sample through it.
    """
    return xsec * LUMI_PB / nevts_total


@dataclass(frozen=True)
class InputFile:
    """One input ROOT file and its unskimmed event count."""

    path: str
    nevts: int


@dataclass(frozen=True)
class Sample:
    """One (process, variation) entry of the catalogue."""

    process: str
    variation: str
    files: tuple[InputFile, ...]
    xsec: float
    nevts_total: int
    xsec_from_catalog: bool = field(default=True, compare=False)

    @property
    def name(self) -> str:
        """The AGC fileset key, e.g. ``ttbar__nominal``."""
        return f"{self.process}__{self.variation}"

    @property
    def weight(self) -> float:
        """Per-event weight of this (possibly sliced) sample, :func:`event_weight`."""
        if self.nevts_total <= 0:
            raise CatalogError(f"sample {self.name} has no input events to normalise to (nevts 0)")
        return event_weight(self.xsec, self.nevts_total)

    def head(self, n_files: int | None) -> Sample:
        """The sample restricted to its first ``n_files`` files, with ``nevts_total`` summed over them."""
        if n_files is None or n_files >= len(self.files):
            files = self.files
        else:
            if n_files < 1:
                raise CatalogError(f"--n-files must be at least 1, got {n_files}")
            files = self.files[:n_files]
        return Sample(
            self.process,
            self.variation,
            files,
            self.xsec,
            sum(f.nevts for f in files),
            self.xsec_from_catalog,
        )


@dataclass(frozen=True)
class Catalog:
    """All samples of a catalogue, in file order."""

    samples: tuple[Sample, ...]
    source: str = "<memory>"

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, name: str) -> Sample:
        for s in self.samples:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        """Fileset names (``process__variation``), in catalogue order."""
        return [s.name for s in self.samples]

    def select(self, names: list[str] | None = None, n_files: int | None = None) -> Catalog:
        """Restrict to the named samples (``process__variation`` or a bare process) and the first N files."""
        chosen = list(self.samples)
        if names:
            unknown = [
                n for n in names if not any(n in (s.name, s.process) for s in self.samples)
            ]
            if unknown:
                raise CatalogError(
                    f"unknown sample(s) {', '.join(unknown)}; the catalogue has: {', '.join(self.names)}"
                )
            chosen = [s for s in chosen if s.name in names or s.process in names]
        return Catalog(tuple(s.head(n_files) for s in chosen), self.source)

    def fileset(self) -> dict[str, dict[str, Any]]:
        """A coffea-style fileset: ``{name: {"files": {path: "Events"}, "metadata": {...}}}``."""
        return {
            s.name: {
                "files": {f.path: "Events" for f in s.files},
                "metadata": {
                    "process": s.process,
                    "variation": s.variation,
                    "xsec": s.xsec,
                    "nevts": s.nevts_total,
                },
            }
            for s in self.samples
        }

    def to_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The catalogue in the ``ntuples.json`` layout (what :func:`save_catalog` writes)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for s in self.samples:
            out.setdefault(s.process, {})[s.variation] = {
                "nevts_total": s.nevts_total,
                "xsec": s.xsec,
                "files": [{"path": f.path, "nevts": f.nevts} for f in s.files],
            }
        return out

    @property
    def n_files(self) -> int:
        """Input files over all samples."""
        return sum(len(s.files) for s in self.samples)

    @property
    def nevts(self) -> int:
        """Unskimmed events over all samples."""
        return sum(s.nevts_total for s in self.samples)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def file_identity(path: str) -> str:
    """What makes two spellings of a path the same file: ``a/../a/f.root`` is ``a/f.root``.

    Local paths are resolved (links too); URLs keep scheme and host and have their path normalised, so the
    same file listed twice is found before its events are counted twice.
    """
    scheme, sep, rest = path.partition("://")
    if not sep:
        return os.path.realpath(path)
    if scheme == "file":
        return os.path.realpath(rest)
    host, slash, tail = rest.partition("/")
    return f"{scheme}://{host}/{posixpath.normpath('/' + tail).lstrip('/')}" if slash else path


def parse_catalog(data: object, source: str = "<memory>") -> Catalog:
    """Validate a decoded catalogue and build a :class:`Catalog`; raises :class:`CatalogError`."""
    if not isinstance(data, Mapping) or not data:
        raise CatalogError(f"{source}: expected a non-empty JSON object {{process: {{variation: ...}}}}")
    samples: list[Sample] = []
    seen_paths: dict[str, str] = {}
    for process, variations in data.items():
        if not isinstance(variations, Mapping) or not variations:
            raise CatalogError(f"{source}: process '{process}' must map variation names to samples")
        for variation, entry in variations.items():
            where = f"{source}: {process}/{variation}"
            if not isinstance(entry, Mapping):
                raise CatalogError(f"{where}: expected an object with 'files' and 'nevts_total'")
            files = entry.get("files")
            if not isinstance(files, list):
                raise CatalogError(f"{where}: 'files' must be a list")
            if not files:
                raise CatalogError(f"{where}: empty file list")
            parsed: list[InputFile] = []
            for i, f in enumerate(files):
                if not isinstance(f, Mapping):
                    raise CatalogError(f"{where}: files[{i}] must be an object with 'path' and 'nevts'")
                path, nevts = f.get("path"), f.get("nevts")
                if not isinstance(path, str) or not path:
                    raise CatalogError(f"{where}: files[{i}].path must be a non-empty string")
                if not _is_int(nevts):
                    raise CatalogError(f"{where}: files[{i}].nevts must be an integer, got {nevts!r}")
                assert isinstance(nevts, int)
                if nevts <= 0:
                    raise CatalogError(
                        f"{where}: files[{i}].nevts is {nevts}: a file's unskimmed event count must be positive "
                        "(it is the normalisation; remove files without events)"
                    )
                same = file_identity(path)
                if same in seen_paths:
                    raise CatalogError(f"{where}: duplicate file {path} (also in {seen_paths[same]})")
                seen_paths[same] = f"{process}/{variation} as {path}"
                parsed.append(InputFile(path, nevts))
            nevts_total = entry.get("nevts_total", sum(f.nevts for f in parsed))
            if not _is_int(nevts_total):
                raise CatalogError(f"{where}: nevts_total must be an integer, got {nevts_total!r}")
            if nevts_total <= 0:
                raise CatalogError(f"{where}: nevts_total is {nevts_total}: it must be positive (the normalisation)")
            xsec = entry.get("xsec")
            from_catalog = xsec is not None
            if xsec is None:
                if process not in XSEC_PB:
                    raise CatalogError(
                        f"{where}: unknown process without 'xsec' (built-in cross sections: {', '.join(XSEC_PB)})"
                    )
                xsec = XSEC_PB[process]
            if not isinstance(xsec, (int, float)) or isinstance(xsec, bool) or xsec < 0:
                raise CatalogError(f"{where}: xsec must be a non-negative number, got {xsec!r}")
            samples.append(
                Sample(str(process), str(variation), tuple(parsed), float(xsec), nevts_total, from_catalog)
            )
    return Catalog(tuple(samples), source)


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Read and validate a catalogue file (default: the bundled ``ntuples.json``)."""
    if path is None:
        from .resources import default_catalog

        path = default_catalog()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise CatalogError(f"cannot read catalogue {p}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CatalogError(f"{p}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return parse_catalog(data, str(p))


def save_catalog(catalog: Catalog, path: str | os.PathLike[str]) -> None:
    """Write a catalogue atomically, with ``xsec`` filled in for every sample."""
    atomic_write_text(Path(path), json.dumps(catalog.to_json(), indent=2) + "\n")


def import_agc_catalog(
    path: str | os.PathLike[str], prefix_from: str | None = None, prefix_to: str | None = None
) -> Catalog:
    """Convert an AGC ``nanoaod_inputs.json`` into our format: add ``xsec``, optionally rewrite path prefixes."""
    if (prefix_from is None) != (prefix_to is None):
        raise CatalogError("--prefix-from and --prefix-to go together")
    return rewrite_prefix(load_catalog(path), prefix_from, prefix_to)


def rewrite_prefix(catalog: Catalog, prefix_from: str | None, prefix_to: str | None) -> Catalog:
    """The catalogue with paths starting with ``prefix_from`` starting with ``prefix_to`` instead.

    How one catalogue serves every way to the same files: the https:// door, EOS, a site's XCache or
    redirector. A ``prefix_from`` that matches no file is refused (a typo would read the original files).
    """
    if (prefix_from is None) != (prefix_to is None):
        raise CatalogError("--prefix-from and --prefix-to go together")
    if prefix_from is None or prefix_to is None:
        return catalog
    paths = [f.path for s in catalog for f in s.files]
    if paths and not any(p.startswith(prefix_from) for p in paths):
        raise CatalogError(f"--prefix-from {prefix_from} matches none of the {len(paths)} files of {catalog.source} "
                           f"(e.g. {paths[0]})")
    samples = []
    for s in catalog:
        files = tuple(
            InputFile(prefix_to + f.path[len(prefix_from) :] if f.path.startswith(prefix_from) else f.path, f.nevts)
            for f in s.files
        )
        samples.append(Sample(s.process, s.variation, files, s.xsec, s.nevts_total, s.xsec_from_catalog))
    return Catalog(tuple(samples), catalog.source)
