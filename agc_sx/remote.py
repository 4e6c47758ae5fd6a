"""Reading input files over the network (XRootD ``root://``, HTTPS): retries, client settings, one-line errors.

At a facility the catalogue's files are ``root://`` (fsspec-xrootd over the XRootD client) or ``https://``
(XRootD's HTTP protocol, read by fsspec/aiohttp). Three things make that usable rather than merely possible:

* :class:`NetworkSource`, an uproot source that retries a failed read a bounded number of times with back-off
  (a server that restarts, a redirector that drops a connection) and then raises *one* line;
* ISA-L for inflating ZLIB baskets (the same bytes, faster), where installed;
* client defaults that fail in seconds rather than the XRootD client's ten minutes per unreachable server
  (set only where the user has not set them);
* :func:`explain`, which turns what uproot, fsspec, aiohttp and XRootD raise into a reason a person can act on:
  a missing file, an untrusted certificate (and how to trust it), a server that is gone, a truncated file.

:func:`configure` sets the XRootD client defaults and the inflater once per process; :func:`uproot_options`,
through which every read of agc-sx goes, calls it, so importing agc-sx changes nothing in the caller's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import uproot.source.chunk
import uproot.source.futures
from uproot.source.coalesce import coalesce_requests
from uproot.source.fsspec import FSSpecSource

from .errors import AgcSxError, RemoteReadError
from .utils import first_line

T = TypeVar("T")

#: URL schemes read over the network.
REMOTE_SCHEMES = ("root", "roots", "http", "https")

#: XRootD client settings (environment variables, read once per process by the client library) unless the
#: user set them: give up connecting after ~10 s instead of 5 x 120 s, and on a stalled request after 5 min.
XROOTD_CLIENT_DEFAULTS = {
    "XRD_CONNECTIONRETRY": "1",
    "XRD_CONNECTIONWINDOW": "10",
    "XRD_REQUESTTIMEOUT": "300",
    "XRD_STREAMERRORWINDOW": "1",  # else a server that restarted is not reconnected to for 30 min
}

#: Environment variables that change the retry policy (tests, or a flaky site): attempts and first delay.
ATTEMPTS_ENV, BACKOFF_ENV = "AGC_SX_READ_ATTEMPTS", "AGC_SX_READ_BACKOFF"


def configure_clients() -> None:
    """Set :data:`XROOTD_CLIENT_DEFAULTS` where the environment does not already say otherwise."""
    for key, value in XROOTD_CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def fast_inflate() -> None:
    """Inflate ROOT's ZLIB baskets with ISA-L when ``isal`` is installed: the same bytes, ~1.7x faster than zlib
    (decompression is most of the time a skim spends reading). Writing (``uproot.ZLIB``) stays on zlib.
    """
    import importlib.util

    import uproot.compression as compression

    if importlib.util.find_spec("isal") is None or getattr(compression._DecompressZLIB, "library", None) != "zlib":
        return
    compression.ZLIB.library = "zlib"  # pinned on the subclass that compresses, before the base class changes
    compression._DecompressZLIB.library = "isal"


@functools.cache
def configure() -> None:
    """:func:`configure_clients` and :func:`fast_inflate`, once per process, before its first read."""
    configure_clients()
    fast_inflate()



def is_remote(path: str) -> bool:
    """Whether ``path`` is read over the network (``root://``, ``https://`` ...)."""
    return "://" in path and path.split("://", 1)[0].lower() in REMOTE_SCHEMES


def _server_path(path: str) -> str:
    """The path on the server of a URL: ``root://host//store/f.root`` -> ``store/f.root``."""
    return path.split("://", 1)[-1].split("/", 1)[-1].lstrip("/")


def server_of(path: str) -> str:
    """``host:port`` of a URL (for messages)."""
    rest = path.split("://", 1)[-1]
    return rest.split("/", 1)[0]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed network read is tried and how long to wait in between (doubling each time)."""

    attempts: int = 4
    backoff: float = 2.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The default policy, or the one ``AGC_SX_READ_ATTEMPTS`` / ``AGC_SX_READ_BACKOFF`` ask for."""
        try:
            attempts = int(os.environ.get(ATTEMPTS_ENV, cls.attempts))
            backoff = float(os.environ.get(BACKOFF_ENV, cls.backoff))
        except ValueError:
            raise AgcSxError(f"{ATTEMPTS_ENV} must be an integer and {BACKOFF_ENV} a number of seconds") from None
        return cls(max(1, attempts), max(0.0, backoff))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the failed ``attempt`` (1-based) before the next one."""
        return self.backoff * 2 ** (attempt - 1)

    def call(self, func: Callable[[], T], path: str, fs: Any = None) -> T:
        """``func()``, tried again after transient network errors; raises :class:`RemoteReadError` at the end.

        ``fs``: the fsspec filesystem ``func`` reads through, whose cached handles are dropped between tries.
        """
        for attempt in range(1, self.attempts + 1):
            try:
                return func()
            except Exception as err:
                if not is_transient(err):
                    raise
                if attempt == self.attempts:
                    raise RemoteReadError(gave_up(path, self.attempts, err)) from None
                forget_connections(path, fs)
                time.sleep(self.delay(attempt))
        raise AssertionError("unreachable")


def gave_up(path: str, attempts: int, err: BaseException) -> str:
    return (f"{path}: server {server_of(path)} unreachable, gave up after {attempts} attempts "
            f"({first_line(err)})")


# --- classifying errors -----------------------------------------------------------------------------------------


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes/contexts, outermost first (coffea and dask wrap reader errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen



#: Fragments of XRootD client messages that mean the connection, not the file, is the problem.
_XROOTD_TRANSIENT = ("socket error", "connection error", "connection refused", "operation expired",
                     "stream", "timed out", "invalid session", "reset by peer", "broken pipe")
#: Fragments that mean the file is not there.
_NOT_FOUND = ("[3011]", "no such file", "not found")


def _certificate_error(err: BaseException) -> ssl.SSLCertVerificationError | None:
    for e in _chain(err):
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        inner = getattr(e, "certificate_error", None) or getattr(e, "os_error", None)
        if isinstance(inner, ssl.SSLCertVerificationError):
            return inner
    return None


def is_not_found(err: BaseException) -> bool:
    for e in _chain(err):
        if isinstance(e, FileNotFoundError):
            return True
        if isinstance(e, OSError) and any(s in str(e).lower() for s in _NOT_FOUND):
            return True
    return False


def is_transient(err: BaseException) -> bool:
    """A network error worth retrying: the connection failed, not the file or the certificate."""
    if isinstance(err, RemoteReadError) or _certificate_error(err) is not None or is_not_found(err):
        return False
    for e in _chain(err):
        module = type(e).__module__
        if module.startswith("aiohttp") and type(e).__name__ in (
            "ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
            "ClientPayloadError", "ConnectionTimeoutError", "SocketTimeoutError",
        ):
            return True
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(e, OSError) and any(s in str(e).lower() for s in _XROOTD_TRANSIENT):
            return True
        # XRootD handles cached by fsspec-xrootd from before the connection dropped
        if isinstance(e, ValueError) and "closed file" in str(e):
            return True
    return False


def certificate_hint(path: str, err: BaseException) -> str | None:
    """One line for an untrusted server certificate, with how to trust it; None for other errors."""
    cert = _certificate_error(err)
    if cert is None:
        return None
    why = getattr(cert, "verify_message", None) or first_line(cert)
    return (f"{path}: the server certificate of {server_of(path)} is not trusted ({why}); if it is your "
            "facility's, trust its CA with SSL_CERT_FILE=/path/to/ca-bundle.pem (or SSL_CERT_DIR)")


def explain(err: BaseException, path: str) -> str | None:
    """A one-line reason for a failed read of ``path``, or None when ``err`` is not a read problem (a bug)."""
    for e in _chain(err):
        if isinstance(e, RemoteReadError):
            return str(e)
    hint = certificate_hint(path, err)
    if hint is not None:
        return hint
    if is_not_found(err):
        return f"{path}: " + (f"No such file on the server {server_of(path)}" if is_remote(path)
                              else "No such file or directory")
    if is_transient(err):
        return gave_up(path, 1, err) if is_remote(path) else f"{path}: {first_line(err)}"
    for e in _chain(err):
        if isinstance(e, PermissionError) or "[3010]" in str(e):
            return f"{path}: permission denied"
    return None


def root_header_problem(path: str) -> str | None:
    """Why ``path`` cannot be a readable ROOT file, judged from its header and size; None if it looks fine."""
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(path)
        head = fs.cat_file(inner, start=0, end=64)
        size = int(fs.size(inner))
    except Exception:
        return None
    if size == 0:
        return "empty file (0 bytes), not a ROOT file"
    if head[:4] != b"root":
        text = head[:24].decode("latin-1")
        shown = "".join(c if c.isprintable() else "." for c in text)
        kind = "text" if all(c.isprintable() or c in "\r\n\t" for c in text) else "data"
        return f"not a ROOT file: it starts with {shown!r} ({kind}, not the ROOT signature 'root')"
    if len(head) < 20:
        return f"truncated ROOT file: {size:,} bytes, not even a whole header"
    version = int.from_bytes(head[4:8], "big")
    end = int.from_bytes(head[12:20] if version >= 1_000_000 else head[12:16], "big")
    if size < end:
        return f"truncated ROOT file: {size:,} of {end:,} bytes (the size its header records); fetch it again"
    return None


def explain_any(err: BaseException, paths: Iterable[str]) -> str | None:
    """A one-line reason for a failure somewhere among ``paths`` (coffea and dask name the file in their
    wrappers), including a damaged ROOT file; None when ``err`` is no read problem (a bug keeps its traceback).
    """
    chain = _chain(err)
    texts = " ".join(str(e) for e in chain)
    candidates = list(paths)
    # the URL itself, or (XRootD's messages) the path on the server, or the file name
    path = next((p for p in candidates if p in texts), None)
    path = path or next((p for p in candidates if is_remote(p) and "/" + _server_path(p) in texts), None)
    path = path or next((p for p in candidates if p.rsplit("/", 1)[-1] in texts), None)
    reason = explain(err, path if path is not None else "an input file")
    if reason is None and path is not None and any(isinstance(e, (OSError, ValueError)) for e in chain):
        problem = root_header_problem(path)
        reason = f"{path}: {problem}" if problem else None
    if reason is None:
        oserror = next((e for e in reversed(chain) if isinstance(e, OSError)), None)
        if oserror is not None:
            reason = f"{path or 'an input file'}: {' '.join(str(oserror).split()) or type(oserror).__name__}"
    return reason


def forget_connections(path: str, fs: Any = None) -> None:
    """Drop cached connections and file handles to the server of ``path`` so that the next try reconnects.

    fsspec keeps one filesystem object per server and fsspec-xrootd keeps the open XRootD file handles in it
    (``fs``, and every cached one); after a server restart those handles are dead ("I/O operation on closed
    file") and closing them at exit prints a traceback. They are dropped quietly here instead.
    """
    if not is_remote(path):
        return
    import fsspec

    protocol = path.split("://", 1)[0].lower()
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return
    for instance in [fs, *getattr(cls, "_cache", {}).values()]:
        cache = getattr(getattr(instance, "_readonly_filehandle_cache", None), "_cache", None)
        if isinstance(cache, dict):
            items = list(cache.values())
            cache.clear()
            for item in items:
                with contextlib.suppress(Exception):
                    item.handle.close(callback=lambda *args: None)
    with contextlib.suppress(Exception):
        cls.clear_instance_cache()


# --- the uproot source ------------------------------------------------------------------------------------------


class NetworkSource(FSSpecSource):
    """uproot's fsspec source with bounded, backed-off retries of every read and errors raised, not returned.

    Pass it as ``handler=`` to ``uproot.open`` (coffea: ``uproot_options``). Local files work too (their
    errors are never transient). The retry policy comes from :meth:`RetryPolicy.from_env` when the source
    is created, in whichever process reads.
    """

    def __init__(self, file_path: str, **options: Any) -> None:
        self._policy = RetryPolicy.from_env()
        super().__init__(file_path, **options)

    def chunk(self, start: int, stop: int) -> uproot.source.chunk.Chunk:
        """One byte range, retried as :class:`RetryPolicy` says."""
        if self.closed:
            raise OSError(f"file {self._file_path!r} is closed")
        self._num_requests += 1
        self._num_requested_chunks += 1
        self._num_requested_bytes += stop - start
        data = self._policy.call(lambda: self._fs.cat_file(self._file_path, start=start, end=stop),
                                 self._file_path_orig, self._fs)
        return uproot.source.chunk.Chunk(self, start, stop, uproot.source.futures.TrivialFuture(data))

    def chunks(self, ranges: list[tuple[int, int]], notifications: queue.Queue[Any]) -> list[uproot.source.chunk.Chunk]:
        """Several byte ranges, coalesced into few requests where the filesystem reads ranges concurrently."""
        if not self._async_impl or not hasattr(self._fs, "_cat_ranges"):
            return super().chunks(ranges, notifications)
        if self.closed:
            raise OSError(f"file {self._file_path!r} is closed")
        self._num_requests += 1
        self._num_requested_chunks += len(ranges)
        self._num_requested_bytes += sum(stop - start for start, stop in ranges)

        def submit(request_ranges: list[tuple[int, int]]) -> Any:
            return self._executor.submit(self._fetch(request_ranges))

        return coalesce_requests(ranges, submit, self, notifications, config=self._coalesce_config)

    async def _fetch(self, request_ranges: list[tuple[int, int]]) -> list[bytes]:
        """One coalesced request, retried; a failed range raises (fsspec would hand the exception back as data)."""
        paths = [self._file_path] * len(request_ranges)
        starts = [start for start, _ in request_ranges]
        ends = [stop for _, stop in request_ranges]
        policy = self._policy
        for attempt in range(1, policy.attempts + 1):
            try:
                results = await self._fs._cat_ranges(paths=paths, starts=starts, ends=ends)
                for r in results:
                    if isinstance(r, BaseException):
                        raise r
                return list(results)
            except Exception as err:
                if not is_transient(err):
                    raise
                if attempt == policy.attempts:
                    raise RemoteReadError(gave_up(self._file_path_orig, policy.attempts, err)) from None
                forget_connections(self._file_path_orig, self._fs)
                await asyncio.sleep(policy.delay(attempt))
        raise AssertionError("unreachable")


def uproot_options() -> dict[str, Any]:
    """Options for ``uproot.open`` (and coffea's ``uproot_options``) that read through :class:`NetworkSource`."""
    configure()
    return {"handler": NetworkSource}


def bytes_read(file: Any) -> int:
    """Bytes an open uproot file requested from its source (over the network for a remote file)."""
    source = getattr(getattr(file, "file", file), "source", None)
    return int(getattr(source, "num_requested_bytes", 0) or 0)


__all__ = [
    "NetworkSource",
    "RemoteReadError",
    "RetryPolicy",
    "bytes_read",
    "configure_clients",
    "explain",
    "explain_any",
    "fast_inflate",
    "forget_connections",
    "is_remote",
    "is_transient",
    "root_header_problem",
    "uproot_options",
]
