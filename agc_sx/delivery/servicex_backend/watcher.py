"""Progressive storing: each file the client has finished downloading is verified and recorded at once."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...catalogue import InputFile
from ...manifest import Manifest, OutputFile, contained
from ..common import (
    DeliveryError,
    store_output,
)
from ._scrub import _Scrubber
from .common import _Request, log
from .naming import _did_output_name, match_outputs

WATCH_INTERVAL_S = 0.25  # how often the cache folder is looked at while the client runs


@dataclass
class _Stored:
    out: OutputFile
    source: str  # the client's file it was copied from (real path)
    stamp: tuple[int, int]  # (size, mtime_ns) of that file when it was copied


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class _Store:
    """Every change to the manifest during one delivery, serialised by one lock (watcher and main thread).

    Remembers what this run stored per request, so that the end-of-call collection neither stores a file
    twice nor keeps one the client did not return in the end.
    """

    def __init__(self, manifest: Manifest, columns: Sequence[str] | None, scrub: _Scrubber) -> None:
        self.manifest = manifest
        self.columns = columns
        self.scrub = scrub
        self.lock = threading.RLock()
        self.stored: dict[str, dict[str, _Stored]] = {}  # title -> input path, or returned file name for a DID
        self.delivered = 0

    @staticmethod
    def key(r: _Request, source: Path, input_path: str | None = None) -> str:
        return source.name if r.did is not None else str(input_path)

    def current(self, r: _Request, key: str, source: Path) -> bool:
        """True when ``source`` is already stored for ``key`` and has not changed since it was copied."""
        done = self.stored.get(r.title, {}).get(key)
        try:
            return done is not None and done.source == os.path.realpath(source) and done.stamp == _stamp(source)
        except OSError:
            return False

    def put(self, r: _Request, source: Path, input_file: InputFile | None = None) -> OutputFile:
        """Verify and store one returned file (of ``input_file``, or of the request's dataset id); DeliveryError."""
        with self.lock:
            try:
                stamp = _stamp(source)
            except OSError as err:
                raise DeliveryError(f"cannot read {source.name}: {err.strerror or err}") from None
            key = self.key(r, source, input_file.path if input_file else None)
            if r.did is None:
                assert input_file is not None
                out = store_output(
                    self.manifest, r.plan, input_file, source, query_sha256=r.qhash, expected_columns=self.columns
                )
            else:
                earlier = self.stored.get(r.title, {}).get(key)
                name = earlier.out.file if earlier else _did_output_name(r, source.name)
                out = store_output(
                    self.manifest, r.plan, r.inputs[0], source, query_sha256=r.qhash,
                    expected_columns=self.columns, name=name, nevts_input=0,
                )
            mine = self.stored.setdefault(r.title, {})
            if key not in mine:
                self.delivered += 1
            mine[key] = _Stored(out, os.path.realpath(source), stamp)
            return out

    def take(self, r: _Request, source: Path) -> None:
        """The watcher's entry: map a freshly downloaded file to its input and store it once."""
        with self.lock:
            if r.did is None:
                found, _ = match_outputs([str(source)], [f.path for f in r.inputs])
                if not found:
                    return  # not a file of ours (e.g. a temporary name): left to the end-of-call collection
                path = next(iter(found))
                input_file = next(f for f in r.inputs if f.path == path)
                if not self.current(r, path, source):
                    self.put(r, source, input_file)
            elif not self.current(r, source.name, source):
                self.put(r, source)

    def drop(self, r: _Request, keys: Iterable[str] | None = None) -> None:
        """Un-record and delete what this run stored for ``r`` (all, or the given keys)."""
        with self.lock:
            mine = self.stored.get(r.title, {})
            for key in list(mine if keys is None else keys):
                done = mine.pop(key, None)
                if done is None:
                    continue
                record = r.plan.record
                record.outputs = [o for o in record.outputs if o.file != done.out.file]
                contained(self.manifest.base, done.out.file).unlink(missing_ok=True)
                self.delivered -= 1
            self.manifest.save()


def _subfolders(cache: Path) -> set[str]:
    try:
        return {p.name for p in cache.iterdir() if p.is_dir()}
    except OSError:
        return set()


def _transform_titles(cache: Path) -> dict[str, str]:
    """Request id -> title of the transforms the client recorded in its cache database (``.servicex/db.json``).

    The client writes a record when it submits a transform, before it downloads anything; read it under the
    client's own file lock. Any problem gives an empty answer: the end-of-call collection stores everything.
    """
    from filelock import FileLock, Timeout

    db = cache / ".servicex" / "db.json"
    try:
        with FileLock(str(cache / ".servicex" / "db.lock"), timeout=1.0):
            doc = json.loads(db.read_text())
    except (OSError, ValueError, Timeout):
        return {}
    records: list[Any] = []
    if isinstance(doc, dict):
        for table in doc.values():
            if isinstance(table, dict):
                records.extend(table.values())
    return {
        str(rec["request_id"]): str(rec["title"])
        for rec in records
        if isinstance(rec, dict) and rec.get("request_id") and rec.get("title")
    }


def _open_here() -> set[str] | None:
    """Real paths of the files this process has open (Linux ``/proc``), or None where that cannot be seen.

    aioboto3 writes a download in place under its final name, so a file that is still open is unfinished.
    """
    fd_dir = "/proc/self/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    paths = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            paths.add(os.readlink(os.path.join(fd_dir, fd)))
    return paths


class _Watcher:
    """While the client runs: store each file it has finished downloading into our layout.

    The client downloads into ``<cache>/<request id>/``; the request id maps to a title through the client's
    cache database. A file counts as downloaded when its name ends in ``.parquet``, it is not empty, and no
    file descriptor of this process had it open after it was looked at, with size and mtime unchanged in
    between (aioboto3 writes in place under the final name, so an open file is unfinished); where ``/proc``
    cannot tell, its size and mtime must instead be unchanged since the previous poll. It is then copied,
    verified and recorded under the store's lock (``store_output``); a copy that fails its checks is left to
    the end-of-call collection, which also has the client's final word on every file. Folders of earlier runs
    (cached results) are left to that collection too.
    """

    def __init__(
        self, store: _Store, cache: Path, requests: dict[str, _Request], earlier: set[str], interval: float
    ) -> None:
        self.store, self.cache, self.requests, self.earlier = store, cache, requests, earlier
        self.interval = interval
        self._seen: dict[Path, tuple[int, int]] = {}
        self._tried: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agc-sx-servicex-watcher", daemon=True)

    def __enter__(self) -> _Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception as err:  # never let a watcher problem stop the delivery
                log.debug("watcher: %s: %s", type(err).__name__, self.store.scrub(str(err)))

    def scan(self) -> None:
        folders = sorted(_subfolders(self.cache) - self.earlier - {".servicex"})
        if not folders:
            return
        owners = _transform_titles(self.cache)
        can_see_open = _open_here() is not None
        candidates: list[tuple[_Request, Path, tuple[int, int]]] = []
        for folder in folders:
            r = self.requests.get(owners.get(folder, ""))
            if r is None:
                continue
            for path in sorted((self.cache / folder).glob("*.parquet")):
                try:
                    stamp = _stamp(path)
                except OSError:
                    continue
                previous, self._seen[path] = self._seen.get(path), stamp
                if stamp[0] == 0 or self._tried.get(path) == stamp or (not can_see_open and stamp != previous):
                    continue
                candidates.append((r, path, stamp))
        busy = _open_here() if candidates else None  # after the stats: open now means unfinished
        for r, path, stamp in candidates:
            if self._stop.is_set():
                return
            if busy is not None and os.path.realpath(path) in busy:
                continue
            try:
                if _stamp(path) != stamp:
                    continue
            except OSError:
                continue
            self._tried[path] = stamp
            try:
                self.store.take(r, path)
            except DeliveryError as err:
                log.debug("watcher: %s not stored yet: %s", path.name, self.store.scrub(str(err)))
