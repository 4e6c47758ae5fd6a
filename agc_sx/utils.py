"""Small helpers shared by every stage: atomic writes, checksums, one-line error messages."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

#: Suffix of files being written; a run that dies leaves only names like this behind, never a final name.
PARTIAL_SUFFIX = ".part"



@functools.cache
def _new_file_mode() -> int:
    """``0o666`` minus the umask: the mode ``open()`` gives a new file (``mkstemp`` gives ``0o600``).

    Read from ``/proc`` where it can be: setting the umask to read it would race with other threads.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def first_line(err: object) -> str:
    """The first line of an error's message, or its type name when it has none: what a user is shown."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp_path, _new_file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically (temporary file, then rename)."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def user_cache_dir() -> Path:
    """agc-sx's folder in the user's cache (``$XDG_CACHE_HOME/agc-sx``): things that are slow to rebuild and
    safe to lose (the skim's qastle text, the BDT calibration), each under a key of everything it depends on.
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agc-sx"


def sha256_text(text: str) -> str:
    """Hex SHA-256 of ``text`` (UTF-8): the fingerprint of queries and configurations."""
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C for the few lines that record an interrupted run (main thread only; restored after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


#: The journal of a set replacement in progress (see :class:`OutputSet`).
SET_JOURNAL = ".agc-sx-outputs.json"
_SET_PREFIX = ".agc-sx-set."


class OutputSet:
    """Files of one folder that are replaced together: all new, or (after a crash) all old, never a mix.

    Each member is written to a temporary file beside it (:meth:`path`). :meth:`commit` then writes a journal
    naming every rename (and every old member the new set does not have, to remove), performs them and
    deletes the journal. A run killed before the journal leaves only temporary files; one killed after it
    leaves a journal that the next :class:`OutputSet` (or :func:`recover_output_set`) carries out. Either way
    the next run removes the leftovers.
    """

    def __init__(self, folder: Path, members: Iterable[str]) -> None:
        self.folder = Path(folder)
        self.members = list(dict.fromkeys(members))
        self.folder.mkdir(parents=True, exist_ok=True)
        recover_output_set(self.folder)
        self._temps: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """Where to write the new ``name`` of the set (a temporary file in the same folder)."""
        if name not in self.members:
            raise ValueError(f"{name} is not a member of this output set")
        if name not in self._temps:
            fd, tmp = tempfile.mkstemp(prefix=f"{_SET_PREFIX}{name}.", suffix=PARTIAL_SUFFIX, dir=self.folder)
            os.close(fd)
            self._temps[name] = Path(tmp)
        return self._temps[name]

    def commit(self) -> None:
        """Move every written member into place and remove the members that were not written."""
        for tmp in self._temps.values():
            os.chmod(tmp, _new_file_mode())
        journal = {
            "replace": {name: tmp.name for name, tmp in self._temps.items()},
            "remove": [name for name in self.members if name not in self._temps],
        }
        atomic_write_text(self.folder / SET_JOURNAL, json.dumps(journal))
        self._temps = {}  # from here on the journal owns them: a failure below is finished by the next run
        recover_output_set(self.folder)

    def discard(self) -> None:
        """Forget an uncommitted set (its temporary files are deleted; the old set stays as it was)."""
        for tmp in self._temps.values():
            tmp.unlink(missing_ok=True)
        self._temps = {}

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def recover_output_set(folder: Path) -> None:
    """Finish a set replacement a killed run had committed, and remove what an uncommitted one left behind."""
    folder = Path(folder)
    journal_path = folder / SET_JOURNAL
    try:
        journal = json.loads(journal_path.read_text())
    except FileNotFoundError:
        journal = None
    except (OSError, ValueError):
        journal = {}
    if journal is not None:
        replace = journal.get("replace", {}) if isinstance(journal, dict) else {}
        remove = journal.get("remove", []) if isinstance(journal, dict) else []

        def plain(name: object) -> bool:  # a bare file name in this folder, nothing else
            return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name

        if isinstance(replace, dict) and isinstance(remove, list):
            for name, tmp in replace.items():
                if plain(name) and plain(tmp) and str(tmp).startswith(_SET_PREFIX) and (folder / tmp).exists():
                    os.replace(folder / tmp, folder / name)
            for name in remove:
                if plain(name) and name not in replace:
                    (folder / name).unlink(missing_ok=True)
        journal_path.unlink(missing_ok=True)
    for leftover in folder.glob(f"{_SET_PREFIX}*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)
