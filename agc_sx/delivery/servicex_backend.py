"""``agc-sx deliver --backend servicex``: run the skim on a ServiceX deployment and store what comes back.

Built on the servicex 3.3 client (``servicex.deliver``), with the gaps it leaves closed here
(see /work/shared/notes/servicex-client.md):

* a transform that ends ``Complete`` with failed files hands back a partial list as if it were whole: every
  returned file is mapped back to its input (object name = input path with ``/`` -> ``:``), so the missing
  inputs are known, recorded in the manifest, and the next run asks only for them;
* the client retries a dead server for two minutes: a short ``GET /servicex`` fails in seconds first;
* the client's cache ignores the server URL and sample name and trusts deleted files: we give it a cache folder
  of ours under the output folder (one per endpoint URL), and check rows and checksums of what we store;
* ``Fatal`` / ``Canceled`` / ``Bad Dataset`` / refused submissions / auth errors / short downloads become one
  line naming the sample; other samples are still delivered;
* the token never reaches a message, a log record or the manifest.

Progressive storing: while the client runs, a watcher thread stores every file the client has finished
downloading (verified and recorded in ``manifest.json``, like every output), so ``agc-sx run`` can process it
while the rest is still being transformed. When the client returns, its list is the final word: what the
watcher has not stored is stored then, nothing is stored twice, and what a failed sample had already stored
is taken back (un-recorded and deleted), so the end state is that of storing everything at the end.

Dataset ids (``--dataset-type rucio|cernopendata``): each catalogue file entry is a Rucio DID or a CERN Open
Data record id with the unskimmed ``nevts`` of the whole dataset. The server expands it into files we cannot
name up front, so the dataset is the unit of accounting: every file it returns is stored as one output
(``<sample folder>/<returned object name>.parquet``) whose ``input`` is the dataset id; the dataset's
``nevts`` sits on the first of these outputs by name and 0 on the others (``nevts_total`` stays a plain sum),
and only once the server reports the transform complete with no failed file; otherwise none of its files is
kept and the sample is incomplete. One ServiceX request is made per dataset id.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, TextIO

from ..catalogue import Catalog, InputFile
from ..errors import Interrupted
from ..manifest import Manifest, OutputFile, contained, safe_component
from ..query import OUTPUT_COLUMN_NAMES, query_hash
from ..utils import sigint_ignored
from .common import (
    DeliveryError,
    DeliveryReport,
    Plan,
    check_dirnames,
    finish_sample,
    open_delivery,
    plan,
    record_failure,
    store_output,
)
from .databinder_config import ConfigError, Job, load_databinder_config

log = logging.getLogger(__name__)

BACKEND = "servicex"
PREFLIGHT_TIMEOUT_S = 5.0
CACHE_DIRNAME = ".servicex-cache"
TITLE_LIMIT = 128  # the client truncates longer titles when the server states no limit
DATASET_TYPES = ("filelist", "rucio", "cernopendata")
WATCH_INTERVAL_S = 0.25  # how often the cache folder is looked at while the client runs
DID_NAME_LIMIT = 120  # longest output name stem for the files a dataset id expands into
_RUCIO_DID = re.compile(r"[\w.\-]+:(?!//)\S+")


class ServiceXError(DeliveryError):
    """A delivery problem that stops every sample (config, endpoint, authentication); one line."""


# ---- token hygiene --------------------------------------------------------------------------------------------
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


class _Scrubber:
    """Removes secrets (the refresh token, any bearer or JWT) from text before it is shown or stored."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        self.secrets = [s for s in secrets if s]

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return _JWT.sub("***", _BEARER.sub(r"\1***", text))


def _one_line(err: BaseException, scrub: _Scrubber) -> str:
    inner = getattr(err, "_exc", None)  # servicex's ReturnValueException wraps the real error
    if isinstance(inner, BaseException):
        err = inner
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return scrub(text)


# ---- the servicex.yaml --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    name: str
    url: str
    token: str
    config_file: str | None


def resolve_endpoint(servicex_config: Path | None, endpoint: str | None) -> Endpoint:
    """Find ``servicex.yaml`` / ``.servicex`` the client's way (or the given file) and pick the endpoint."""
    from servicex.configuration import Configuration

    if servicex_config is not None and not Path(servicex_config).is_file():
        raise ServiceXError(f"ServiceX config {servicex_config} does not exist")
    try:
        cfg = Configuration.read(str(servicex_config) if servicex_config else None)
    except NameError:
        raise ServiceXError(
            "no servicex.yaml or .servicex found (searched this folder, its parents and your home folder); "
            "pass --servicex-config PATH or use --backend local"
        ) from None
    except Exception as err:
        raise ServiceXError(f"cannot read the ServiceX config: {type(err).__name__}") from None
    endpoints = cfg.endpoint_dict()
    if not endpoints:
        raise ServiceXError(f"{cfg.config_file}: no api_endpoints")
    name = endpoint or cfg.default_endpoint or cfg.api_endpoints[0].name
    if name not in endpoints:
        raise ServiceXError(
            f"endpoint {name!r} is not in {cfg.config_file} (it has: {', '.join(endpoints)})"
        )
    ep = endpoints[name]
    return Endpoint(name, ep.endpoint.rstrip("/"), ep.token or "", cfg.config_file)


def preflight(ep: Endpoint, scrub: _Scrubber, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """``GET /servicex`` with a short timeout: a dead or broken server fails in seconds, not minutes."""
    import httpx

    try:
        r = httpx.get(f"{ep.url}/servicex", timeout=timeout)
    except httpx.HTTPError as err:
        raise ServiceXError(
            f"ServiceX endpoint {ep.name} at {ep.url} is unreachable ({type(err).__name__}: {scrub(str(err))})"
        ) from None
    if r.status_code in (401, 403):
        raise ServiceXError(f"ServiceX endpoint {ep.name} at {ep.url} refused access (HTTP {r.status_code})")
    if r.status_code >= 400:
        raise ServiceXError(f"ServiceX endpoint {ep.name} at {ep.url} answered HTTP {r.status_code}")
    try:
        info = r.json()
        codegens = info.get("code-gen-image", {})
    except (ValueError, AttributeError):
        raise ServiceXError(f"{ep.url} does not look like a ServiceX server (GET /servicex is not JSON)") from None
    if "uproot" not in codegens:
        raise ServiceXError(
            f"ServiceX endpoint {ep.name} has no uproot transformer (it has: {', '.join(codegens) or 'none'})"
        )


# ---- mapping returned files to inputs ------------------------------------------------------------------------
def _sanitize(name: str) -> str:
    """What servicex's MinioAdapter does to an object name when it writes the download."""
    return name.replace("*", "_").replace(";", "_").replace(":", "_")


def _object_candidates(path: str) -> list[str]:
    """Object names a ServiceX transformer may give the output of ``path``."""
    flat = path.replace("/", ":")
    return [flat + ".parquet", flat]


def match_outputs(returned: Sequence[str], inputs: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Map downloaded files back to the input paths they came from: ``({input: local file}, unmatched)``.

    Exact object names first (also in their hashed short form, ``_<sha1><tail>``); then, for servers that name
    objects differently, a unique match on the input file's stem.
    """
    exact: dict[str, str] = {}
    hashed: dict[str, str] = {}
    for p in inputs:
        for obj in _object_candidates(p):
            exact.setdefault(_sanitize(obj), p)
            hashed.setdefault(hashlib.sha1(obj.encode()).hexdigest(), p)
    found: dict[str, str] = {}
    unmatched: list[str] = []
    for local in returned:
        name = PurePosixPath(local).name
        src = exact.get(name)
        if src is None and name.startswith("_") and len(name) > 41:
            src = hashed.get(name[1:41])
        if src is None:
            stem = name.removesuffix(".parquet")
            hits = [p for p in inputs if stem.endswith(_sanitize(PurePosixPath(p.split("?", 1)[0]).name))]
            src = hits[0] if len(hits) == 1 else None
        if src is None or src in found:
            unmatched.append(local)
        else:
            found[src] = local
    return found, unmatched


# ---- the delivery ----------------------------------------------------------------------------------------------
def _titles(names: Sequence[str]) -> list[str]:
    """Unique ServiceX sample titles: the sanitised names, shortened with a hash if too long or repeated."""
    out: list[str] = []
    for name in names:
        t = safe_component(name)
        if len(t) > TITLE_LIMIT or t in out:
            t = t[: TITLE_LIMIT - 9] + "_" + query_hash(name)[:8]
        out.append(t)
    return out


@contextlib.contextmanager
def _client_logs_silenced() -> Iterator[None]:
    """The client logs tracebacks for failures we report as one line each; keep them out of the terminal."""
    loggers = [logging.getLogger(n) for n in ("servicex", "asyncio")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old, strict=True):
            lg.setLevel(lvl)


def _cache_dir(output_dir: Path, ep: Endpoint) -> Path:
    """Our cache for the client: under the output folder, one per server URL (the client's key ignores it)."""
    return output_dir.resolve() / CACHE_DIRNAME / query_hash(ep.url)[:12]


class _ScrubbedStream(io.TextIOBase):
    """Forwards to a terminal stream with secrets removed: the client prints server messages verbatim."""

    def __init__(self, inner: TextIO, scrub: _Scrubber) -> None:
        self._inner, self._scrub = inner, scrub

    def write(self, text: str) -> int:
        self._inner.write(self._scrub(text))
        return len(text)

    def flush(self) -> None:
        self._inner.flush()

    def isatty(self) -> bool:
        return self._inner.isatty()

    def fileno(self) -> int:
        return self._inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._inner, "encoding", "utf-8")


def _client_cache_arg(cache: Path) -> str:
    """Spell ``cache`` so that the client keeps it where it is.

    The client moves any cache path whose first component is ``/tmp`` under ``$TMPDIR``; a path relative to
    the working directory escapes that rule, and the client resolves its downloads to absolute paths.
    """
    absolute = cache.resolve()
    candidates = [str(absolute), os.path.relpath(absolute)]
    for c in candidates:
        parts = PurePath(c).parts
        if len(parts) < 2 or parts[1] != "tmp":
            return c
    return str(absolute)


class ServerLost(ServiceXError):
    """The server stopped answering while transforms were running."""


#: While the client runs, ``GET /servicex`` is asked this often; so many failures in a row mean the server is
#: gone (the client itself would retry its status polls for minutes before it gives up).
HEARTBEAT_S = 5.0
HEARTBEAT_FAILURES = 3
#: How long a cancelled client gets to wind down (twice: our task, then the client's own) before we go on.
WIND_DOWN_S = 0.5


#: Event loops (and their tasks) of clients that did not end when cancelled; see :func:`_run_client`.
_ABANDONED: list[tuple[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]]] = []


async def _server_gone(ep: Endpoint, interval: float, failures: int) -> None:
    """Return once ``failures`` heartbeats in a row got no answer from the server."""
    import httpx

    missed = 0
    async with httpx.AsyncClient(timeout=interval) as client:
        while missed < failures:
            await asyncio.sleep(interval)
            try:
                await client.get(f"{ep.url}/servicex")
                missed = 0
            except httpx.HTTPError:
                missed += 1


def _run_client(
    spec: dict[str, Any], ep: Endpoint, cache: Path, quiet: bool, scrub: _Scrubber
) -> dict[str, Any]:
    """``servicex.deliver`` in an event loop of ours, on a daemon thread, with a watch on the server.

    The client's own sync wrapper runs in a thread that the interpreter waits for at exit, so Ctrl-C took
    14-34 s; here Ctrl-C cancels the client, waits about a second at most and raises ``KeyboardInterrupt``.
    A server that stops answering ``HEARTBEAT_FAILURES`` heartbeats in a row raises :class:`ServerLost`.
    """
    from servicex.servicex_client import deliver_async

    async def main() -> dict[str, Any]:
        client = asyncio.ensure_future(
            deliver_async(
                spec,
                config_path=ep.config_file,
                servicex_name=ep.name,
                return_exceptions=True,
                fail_if_incomplete=True,
                progress_bar="none" if quiet else "expanded",
                cache_dir=_client_cache_arg(cache),
            )
        )
        watch = asyncio.ensure_future(_server_gone(ep, HEARTBEAT_S, HEARTBEAT_FAILURES))
        try:
            await asyncio.wait({client, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # let both unwind (close their connections) here, not in the garbage collector after the loop
            for task in (watch, client):
                if not task.done():
                    task.cancel()
            await asyncio.wait({watch, client}, timeout=WIND_DOWN_S)
        if not client.done() or client.cancelled():
            raise ServerLost(
                f"lost the connection to ServiceX at {ep.url}: no answer for "
                f"{HEARTBEAT_S * HEARTBEAT_FAILURES:.0f} s"
            )
        return dict(client.result())

    loop = asyncio.new_event_loop()
    # what the cancelled client leaves behind is reported by us in one line, not by asyncio
    loop.set_exception_handler(lambda _loop, ctx: log.debug("client: %s", scrub(str(ctx.get("message")))))
    task = loop.create_task(main())
    finished = threading.Event()
    outcome: dict[str, Any] = {}

    def drive() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome["result"] = loop.run_until_complete(task)
        except BaseException as err:
            outcome["error"] = err
        finally:
            # the client starts tasks of its own (status listeners, downloads): end them inside the loop
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                t.cancel()
            if left:
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(asyncio.wait(left, timeout=WIND_DOWN_S))
            # the client's status poll retries even a cancellation while its server is away: such tasks are
            # kept referenced, with their loop, so that no garbage collection prints their tracebacks later
            stuck = [t for t in left if not t.done()]
            if stuck:
                _ABANDONED.append((loop, stuck))
            else:
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(loop.shutdown_asyncgens())
            finished.set()

    with (
        _client_logs_silenced(),
        contextlib.redirect_stdout(_ScrubbedStream(sys.stdout, scrub)),
        contextlib.redirect_stderr(_ScrubbedStream(sys.stderr, scrub)),
    ):
        threading.Thread(target=drive, name="agc-sx-servicex-client", daemon=True).start()
        try:
            while not finished.wait(0.1):
                pass
        except KeyboardInterrupt:
            loop.call_soon_threadsafe(task.cancel)
            finished.wait(2 * WIND_DOWN_S + 0.2)
            raise
    if not any(loop is held for held, _ in _ABANDONED):
        loop.close()
    if "error" in outcome:
        raise outcome["error"]
    return dict(outcome["result"])


def _valid(guard: Any) -> bool:
    return guard is not None and (not hasattr(guard, "valid") or guard.valid())


@dataclass
class _Request:
    """One ServiceX sample of this run: the missing files of a catalogue sample, or one of its dataset ids."""

    title: str
    job: Job
    plan: Plan
    inputs: list[InputFile]  # file list: the files to fetch; rucio / cernopendata: the one dataset id

    @property
    def did(self) -> str | None:
        """The dataset id (catalogue path) when the server expands it into files, else None."""
        return None if self.job.dataset_type == "filelist" else self.inputs[0].path

    @property
    def qhash(self) -> str:
        return query_hash(self.job.qastle)

    def dataset(self) -> Any:
        from servicex.dataset import CERNOpenData, FileList, Rucio

        if self.did is None:
            return FileList(list(dict.fromkeys(f.path for f in self.inputs)))
        if self.job.dataset_type == "rucio":
            return Rucio(self.did)
        return CERNOpenData(int(self.did))


def _check_dataset_ids(jobs: Sequence[Job]) -> None:
    """Refuse, before anything is submitted, dataset ids the client or server would reject."""
    for job in jobs:
        if job.dataset_type not in DATASET_TYPES:
            raise ServiceXError(
                f"{job.sample.name}: unknown dataset type {job.dataset_type!r} (choose from {', '.join(DATASET_TYPES)})"
            )
        for f in job.sample.files:
            if job.dataset_type == "rucio" and not _RUCIO_DID.fullmatch(f.path):
                raise ServiceXError(f"{job.sample.name}: {f.path!r} is not a Rucio DID (scope:name)")
            if job.dataset_type == "cernopendata" and not f.path.isdigit():
                raise ServiceXError(
                    f"{job.sample.name}: {f.path!r} is not a CERN Open Data record id (a number, e.g. 19980)"
                )


def _requests(jobs: Sequence[Job], plans: dict[str, Plan]) -> list[_Request]:
    """What to ask the server for: one request per sample with missing files, or per dataset id to (re)do."""
    wanted: list[tuple[str, Job, list[InputFile]]] = []
    for job in jobs:
        todo = plans[job.sample.name].todo
        if not todo:
            continue
        if job.dataset_type == "filelist":
            wanted.append((job.sample.name, job, list(todo)))
            continue
        for f in todo:  # titled by the dataset's place in the sample, which does not change between runs
            index = job.sample.files.index(f)
            name = job.sample.name if len(job.sample.files) == 1 else f"{job.sample.name}--{index}"
            wanted.append((name, job, [f]))
    titles = _titles([name for name, _, _ in wanted])
    return [
        _Request(title, job, plans[job.sample.name], inputs)
        for title, (_, job, inputs) in zip(titles, wanted, strict=True)
    ]


def deliver_jobs(
    jobs: Sequence[Job],
    output_dir: Path,
    *,
    servicex_config: Path | None = None,
    endpoint: str | None = None,
    ignore_cache: bool = False,
    force: bool = False,
    quiet: bool = False,
    skim_columns: bool = True,
    progressive: bool = True,
    watch_interval: float = WATCH_INTERVAL_S,
) -> DeliveryReport:
    """Deliver ``jobs`` in one ``servicex.deliver`` call into ``output_dir`` (layout and manifest of common).

    ``skim_columns`` checks every stored file against the skim's columns (off for a user's own query).
    ``progressive`` stores (verifies and records) each file as soon as the client has downloaded it, while
    the client is still running, so a reader of the manifest (``agc-sx run``) can start on it; the end result
    is the same as storing everything after the client returned.
    """
    from servicex.query import FuncADL_Uproot

    output_dir = Path(output_dir)
    _check_dataset_ids(jobs)
    check_dirnames(Catalog(tuple(job.sample for job in jobs)))
    ep = resolve_endpoint(servicex_config, endpoint)
    scrub = _Scrubber([ep.token])
    preflight(ep, scrub)

    texts = {job.qastle for job in jobs}
    text = next(iter(texts)) if len(texts) == 1 else None
    columns = OUTPUT_COLUMN_NAMES if skim_columns else None
    with open_delivery(output_dir, text, query_hash(text) if text is not None else None) as manifest:
        if text is None:
            manifest.extra["queries"] = {job.sample.name: job.qastle for job in jobs}
        plans = {
            job.sample.name: plan(
                manifest,
                job.sample,
                query_hash(job.qastle),
                force,
                backend=BACKEND,
                datasets=job.dataset_type != "filelist",
            )
            for job in jobs
        }
        manifest.save()
        requests = {r.title: r for r in _requests(jobs, plans)}

        def make_spec(wanted: Sequence[str], ignore: bool) -> dict[str, Any]:
            samples = []
            for title in wanted:
                query = FuncADL_Uproot()
                query.set_provided_qastle(requests[title].job.qastle)
                samples.append(
                    {"Name": title, "Dataset": requests[title].dataset(), "Query": query, "IgnoreLocalCache": ignore}
                )
            return {"General": {"OutputFormat": "parquet", "Delivery": "LocalCache"}, "Sample": samples}

        store = _Store(manifest, columns, scrub)
        pending = list(requests)
        results: dict[str, Any] = {}
        started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=60)
        cache = _cache_dir(output_dir, ep)
        earlier = _subfolders(cache)  # transforms of earlier runs: what the client's cache may hand back
        ignore = ignore_cache
        watching = progressive and bool(pending)
        try:
            with _Watcher(store, cache, requests, earlier, watch_interval) if watching else contextlib.nullcontext():
                for _attempt in range(2):
                    if not pending:
                        break
                    got = _run_client(make_spec(pending, ignore), ep, cache, quiet, scrub)
                    results.update(got)
                    # ask once more, bypassing the client's cache, for what it cannot give: files deleted since,
                    # or a transform the server no longer knows (redeployed without its database)
                    pending = [t for t in pending if _stale(got.get(t))]
                    ignore = True
        except KeyboardInterrupt:  # what was stored stays recorded: verified, reused next time
            with sigint_ignored():  # a second Ctrl-C must not break the manifest write into a traceback
                _settle_unfinished(store, plans, jobs, "delivery interrupted (Ctrl-C)")
            raise Interrupted(
                f"interrupted: {store.delivered} file(s) delivered and recorded in {manifest.path}; "
                "run the same command again to fetch the rest"
            ) from None
        except Exception as err:
            message = err.args[0] if isinstance(err, ServerLost) else _fatal_message(err, ep, scrub)
            _settle_unfinished(store, plans, jobs, message)
            if isinstance(err, ServerLost) or store.delivered:
                message += (
                    f"; {store.delivered} file(s) delivered and recorded, the rest marked missing in "
                    f"{manifest.path}: run the same command again to fetch it"
                )
            raise ServiceXError(message) from None

        ask = [
            t for t, r in requests.items()
            if _valid(results.get(t)) and (r.did is not None or len(results[t]) < len(r.inputs))
        ]
        statuses = _final_statuses(ep, cache, ask, started) if ask else {}

        failures: list[str] = []
        with store.lock:
            for title, r in requests.items():
                lines = _collect(store, r, results.get(title), statuses.get(title), earlier)
                failures.extend(f"{r.job.sample.name}: {line}" for line in lines)
            for job in jobs:
                finish_sample(manifest, plans[job.sample.name])
        reused = sum(len(p.done) for p in plans.values())
        names = [job.sample.name for job in jobs]
        return DeliveryReport(manifest, names, failures, store.delivered, reused)


def _stale(guard: Any) -> bool:
    """A result the client's cache cannot stand behind: deleted downloads, or a request id the server lost."""
    if _valid(guard):
        return any(not Path(p).exists() for p in guard)
    if guard is None:
        return False
    try:
        guard[0]
    except Exception as err:
        return "not found" in _one_line(err, _Scrubber())
    return False


def _settle_unfinished(store: _Store, plans: dict[str, Plan], jobs: Sequence[Job], why: str) -> None:
    """After a run that stopped early: every input still missing is recorded as failed with ``why``."""
    with store.lock:
        for job in jobs:
            p = plans[job.sample.name]
            for f in p.todo:
                if p.record.output_for(f.path) is None:
                    p.record.set_failed(f.path, f.nevts, why)
            finish_sample(store.manifest, p)


# ---- storing what comes back, during and after the client call -----------------------------------------------
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

    def retract(self, r: _Request) -> None:
        self.drop(r)


def _did_output_name(r: _Request, returned: str) -> str:
    """``<sample folder>/<name>.parquet`` for one file a dataset id expanded into, from its object name.

    Long names keep their tail (where the file name is) behind a short hash of the whole name; a name that
    another dataset of the same sample already uses gets a hash of this dataset id.
    """
    stem = returned.removesuffix(".parquet").removesuffix(".root")
    stem = safe_component(stem)
    if len(stem) > DID_NAME_LIMIT:
        stem = f"{query_hash(returned)[:8]}-{stem[-(DID_NAME_LIMIT - 9):]}"
    record = r.plan.record
    rel = f"{record.dirname}/{stem}.parquet"
    if any(o.file == rel and o.input != r.did for o in record.outputs):
        rel = f"{record.dirname}/{stem}-{query_hash(str(r.did))[:8]}.parquet"
    return rel


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


def _final_statuses(ep: Endpoint, cache: Path, titles: Sequence[str], since: datetime.datetime) -> dict[str, Any]:
    """The server's last status of each named transform of this run (why files are missing), best effort.

    The client hands back a partial (even empty) list without saying why; a transform that ended ``Fatal`` or
    ``Bad Dataset`` can look just like one with failed files, so ask the server. For a dataset id it is the
    only way to know whether every file it expanded into was transformed.
    """
    from servicex.servicex_client import ServiceXClient

    try:
        with _client_logs_silenced():
            client = ServiceXClient(backend=ep.name, config_path=ep.config_file, cache_dir=_client_cache_arg(cache))
            transforms = client.get_transforms()
    except Exception as err:  # only used to word the message better
        log.debug("cannot list transforms: %s", type(err).__name__)
        return {}
    found: dict[str, Any] = {}
    for t in transforms:
        submitted = t.submit_time
        if submitted is not None and submitted.tzinfo is None:
            submitted = submitted.replace(tzinfo=datetime.timezone.utc)
        if t.title in titles and (submitted is None or submitted >= since):
            best = found.get(t.title)
            if best is None or (submitted and best.submit_time and submitted >= best.submit_time):
                found[t.title] = t
    return found


def _state(status: Any) -> str:
    return str(getattr(status.status, "value", status.status))


def _collect(store: _Store, r: _Request, guard: Any, status: Any, earlier: set[str]) -> list[str]:
    """Settle one request after the client returned: store what the watcher has not, mark the rest failed.

    The client's returned list is the final word: a file the watcher stored that is not in it is dropped, one
    that changed since it was copied is stored again. Returns the user-facing lines (without the sample).
    """
    manifest, p = store.manifest, r.plan
    why: str | None = None
    if guard is None:
        why = "no result from the ServiceX client"
    elif not _valid(guard):
        try:
            guard[0]
        except Exception as err:
            why = _sample_message(err, store.scrub)
    elif status is not None and _state(status) != "Complete":
        why = (
            f"transform failed on ServiceX: it ended {_state(status)!r} "
            f"({status.files_completed} of {status.files} file(s) done)"
        )
    if why is not None:
        store.retract(r)
        for f in r.inputs:
            record_failure(manifest, p, f, why)
        if r.did is not None:
            return [f"{r.did}: {why}; the dataset is not delivered"]
        return [f"{why}; {len(r.inputs)} input file(s) not delivered"]
    if r.did is not None:
        return _collect_dataset(store, r, [Path(x) for x in guard], status, earlier)

    found, unmatched = match_outputs(list(guard), [f.path for f in r.inputs])
    if unmatched:
        log.warning("%s: %d returned file(s) match no input: %s", r.title, len(unmatched), unmatched[:3])
    store.drop(r, [k for k in store.stored.get(r.title, {}) if k not in found])
    lines = []
    for f in r.inputs:
        local = found.get(f.path)
        if local is None:
            why = "the transform of this file failed on ServiceX (re-run to fetch only the missing files)"
            record_failure(manifest, p, f, why)
            lines.append(f"{f.path}: {why}")
            continue
        if store.current(r, f.path, Path(local)):
            continue
        try:
            store.put(r, Path(local), f)
        except DeliveryError as err:
            why = f"returned file rejected: {store.scrub(str(err))}"
            store.drop(r, [f.path])
            record_failure(manifest, p, f, why)
            lines.append(f"{f.path}: {why}")
    return lines


def _collect_dataset(
    store: _Store, r: _Request, returned: list[Path], status: Any, earlier: set[str]
) -> list[str]:
    """A dataset id counts whole or not at all: every file it expanded into transformed and stored.

    Its ``nevts`` then goes on the first of its outputs (by name), 0 on the others. Without a server status
    the result must come from the client's cache, which only keeps transforms without failed files.
    """
    did, f = str(r.did), r.inputs[0]
    problem: str | None = None
    if status is None:
        if not returned or any(p.parent.name not in earlier for p in returned):
            problem = "cannot confirm with the ServiceX server that every file of the dataset was transformed"
    elif status.files_failed:
        problem = (
            f"{status.files_failed} of {status.files} file(s) failed on ServiceX; the dataset counts only "
            "when complete (re-run to fetch it again)"
        )
    elif status.files_completed != len(returned):
        problem = f"{len(returned)} of the {status.files_completed} transformed file(s) came back"
    if problem is None and not returned:
        problem = "the dataset expanded into no files"
    if problem is None:
        names = {p.name for p in returned}
        store.drop(r, [k for k in store.stored.get(r.title, {}) if k not in names])
        for src in returned:
            if store.current(r, src.name, src):
                continue
            try:
                store.put(r, src)
            except DeliveryError as err:
                problem = f"returned file {src.name} rejected: {store.scrub(str(err))}"
                break
    if problem is not None:
        store.retract(r)
        record_failure(store.manifest, r.plan, f, problem)
        return [f"{did}: {problem}"]
    outs = sorted((o for o in r.plan.record.outputs if o.input == did), key=lambda o: o.file)
    for i, o in enumerate(outs):
        o.nevts_input = f.nevts if i == 0 else 0
    store.manifest.save()
    return []


def _sample_message(err: BaseException, scrub: _Scrubber) -> str:
    inner = getattr(err, "_exc", err)
    name = type(inner).__name__
    text = _one_line(err, scrub)
    if name == "ServiceXException":
        return f"transform failed on ServiceX: {text}"
    if name == "AuthorizationError":
        return f"ServiceX refused the credentials: {text}"
    if isinstance(inner, ValueError) and "Invalid transform request" in text:
        return f"submission rejected (HTTP 400): {text}"
    if "WebAPI Error" in text:
        return f"submission failed: {text}"
    if "Download of" in text:
        return f"download interrupted or short: {text}"
    return f"{name}: {text}"


def _fatal_message(err: BaseException, ep: Endpoint, scrub: _Scrubber) -> str:
    name = type(err).__name__
    if name == "AuthorizationError":
        return (
            f"ServiceX endpoint {ep.name} at {ep.url} refused the token in {ep.config_file} "
            "(expired or wrong? download a fresh servicex.yaml from the ServiceX web page)"
        )
    if name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError"):
        return f"lost the connection to ServiceX at {ep.url} ({name})"
    return f"ServiceX delivery failed: {name}: {_one_line(err, scrub)}"


# ---- entry points for the CLI ---------------------------------------------------------------------------------
def deliver_servicex(
    catalog: Catalog,
    output_dir: Path,
    *,
    servicex_config: Path | None = None,
    endpoint: str | None = None,
    ignore_cache: bool = False,
    dataset_type: str = "filelist",
    force: bool = False,
    quiet: bool = False,
    progressive: bool = True,
) -> DeliveryReport:
    """Deliver every catalogue sample through ServiceX with the skim query (all samples in one request).

    ``dataset_type``: the catalogue's paths are files (``filelist``), Rucio DIDs or CERN Open Data record ids.
    ``progressive``: record each output as soon as it has been downloaded (see the module docstring).
    """
    from ..query import query_text

    if dataset_type not in DATASET_TYPES:
        raise ServiceXError(f"unknown dataset type {dataset_type!r} (choose from {', '.join(DATASET_TYPES)})")
    qastle = query_text("Events")
    jobs = [Job(s, qastle, dataset_type) for s in catalog]
    return deliver_jobs(
        jobs,
        Path(output_dir),
        servicex_config=servicex_config,
        endpoint=endpoint,
        ignore_cache=ignore_cache,
        force=force,
        quiet=quiet,
        progressive=progressive,
    )


def deliver_from_config(
    path: Path,
    *,
    servicex_config: Path | None = None,
    force: bool = False,
    quiet: bool = False,
    output_dir: Path | None = None,
    endpoint: str | None = None,
    ignore_cache: bool = False,
) -> DeliveryReport:
    """Deliver a servicex-databinder style YAML through the same code path (its queries parsed, never run).

    ``output_dir`` and ``endpoint``, when given, win over the YAML's ``OutputDirectory`` and
    ``ServiceXBackendName``; ``ignore_cache`` adds to its ``IgnoreServiceXCache``.
    """
    cfg = load_databinder_config(Path(path))
    return deliver_jobs(
        cfg.jobs,
        cfg.output_dir if output_dir is None else Path(output_dir),
        servicex_config=servicex_config,
        endpoint=endpoint or cfg.endpoint,
        ignore_cache=cfg.ignore_cache or ignore_cache,
        force=force,
        quiet=quiet,
        skim_columns=False,
    )


__all__ = [
    "ConfigError",
    "ServiceXError",
    "deliver_from_config",
    "deliver_servicex",
    "match_outputs",
    "preflight",
    "resolve_endpoint",
]
