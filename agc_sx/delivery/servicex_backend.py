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
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, TextIO

from ..catalogue import Catalog
from ..manifest import Manifest, safe_component
from ..query import OUTPUT_COLUMN_NAMES, query_hash
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
def _titles(jobs: Sequence[Job]) -> list[str]:
    """Unique ServiceX sample titles: the sanitised ``process__variation``, shortened with a hash if too long."""
    out: list[str] = []
    for job in jobs:
        t = safe_component(job.sample.name)
        if len(t) > TITLE_LIMIT or t in out:
            t = t[: TITLE_LIMIT - 9] + "_" + query_hash(job.sample.name)[:8]
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
    return output_dir / CACHE_DIRNAME / query_hash(ep.url)[:12]


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


def _run_client(
    spec: dict[str, Any], ep: Endpoint, cache: Path, quiet: bool, scrub: _Scrubber
) -> dict[str, Any]:
    from servicex import deliver

    with (
        _client_logs_silenced(),
        contextlib.redirect_stdout(_ScrubbedStream(sys.stdout, scrub)),
        contextlib.redirect_stderr(_ScrubbedStream(sys.stderr, scrub)),
    ):
        return dict(
            deliver(
                spec,
                config_path=ep.config_file,
                servicex_name=ep.name,
                return_exceptions=True,
                fail_if_incomplete=True,
                progress_bar="none" if quiet else "expanded",
                cache_dir=_client_cache_arg(cache),
            )
        )


def _valid(guard: Any) -> bool:
    return guard is not None and (not hasattr(guard, "valid") or guard.valid())


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
) -> DeliveryReport:
    """Deliver ``jobs`` in one ``servicex.deliver`` call into ``output_dir`` (layout and manifest of common).

    ``skim_columns`` checks every stored file against the skim's columns (off for a user's own query).
    """
    from servicex.dataset import FileList
    from servicex.query import FuncADL_Uproot

    output_dir = Path(output_dir)
    for job in jobs:
        if job.dataset_type != "filelist":
            raise ServiceXError(
                f"{job.sample.name}: dataset type {job.dataset_type} is not supported yet "
                "(agc-sx accounts for every input file, so it needs the file list; use filelist)"
            )
    check_dirnames(Catalog(tuple(job.sample for job in jobs)))
    ep = resolve_endpoint(servicex_config, endpoint)
    scrub = _Scrubber([ep.token])
    preflight(ep, scrub)

    texts = {job.qastle for job in jobs}
    text = next(iter(texts)) if len(texts) == 1 else None
    columns = OUTPUT_COLUMN_NAMES if skim_columns else None
    titles = _titles(jobs)
    with open_delivery(output_dir, text, query_hash(text) if text is not None else None) as manifest:
        if text is None:
            manifest.extra["queries"] = {job.sample.name: job.qastle for job in jobs}
        plans = {
            title: plan(manifest, job.sample, query_hash(job.qastle), force, backend=BACKEND)
            for job, title in zip(jobs, titles, strict=True)
        }
        manifest.save()

        def make_spec(wanted: Sequence[str], ignore: bool) -> dict[str, Any]:
            samples = []
            for job, title in zip(jobs, titles, strict=True):
                if title in wanted:
                    query = FuncADL_Uproot()
                    query.set_provided_qastle(job.qastle)
                    files = list(dict.fromkeys(f.path for f in plans[title].todo))
                    samples.append(
                        {"Name": title, "Dataset": FileList(files), "Query": query, "IgnoreLocalCache": ignore}
                    )
            return {"General": {"OutputFormat": "parquet", "Delivery": "LocalCache"}, "Sample": samples}

        pending = [t for t in titles if plans[t].todo]
        results: dict[str, Any] = {}
        started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=60)
        cache = _cache_dir(output_dir, ep)
        ignore = ignore_cache
        for _attempt in range(2):
            if not pending:
                break
            try:
                got = _run_client(make_spec(pending, ignore), ep, cache, quiet, scrub)
            except Exception as err:
                raise ServiceXError(_fatal_message(err, ep, scrub)) from None
            results.update(got)
            # the client's cache hands back files deleted since: ask once more, bypassing it
            pending = [t for t in pending if _valid(got.get(t)) and any(not Path(p).exists() for p in got[t])]
            ignore = True

        short = [t for t in titles if plans[t].todo and _valid(results.get(t))]
        short = [t for t in short if len(results[t]) < len(plans[t].todo)]
        statuses = _final_statuses(ep, cache, short, started) if short else {}

        failures: list[str] = []
        delivered = 0
        for job, title in zip(jobs, titles, strict=True):
            p = plans[title]
            if p.todo:
                n, lines = _collect(manifest, p, results.get(title), job, columns, scrub, statuses.get(title))
                delivered += n
                failures.extend(f"{job.sample.name}: {line}" for line in lines)
            finish_sample(manifest, p)
        reused = sum(len(p.done) for p in plans.values())
        names = [job.sample.name for job in jobs]
        return DeliveryReport(manifest, names, failures, delivered, reused)


def _final_statuses(ep: Endpoint, cache: Path, titles: Sequence[str], since: datetime.datetime) -> dict[str, Any]:
    """The server's last status of each named transform of this run (why files are missing), best effort.

    The client hands back a partial (even empty) list without saying why; a transform that ended ``Fatal`` or
    ``Bad Dataset`` can look just like one with failed files, so ask the server.
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


def _collect(
    manifest: Manifest,
    p: Plan,
    guard: Any,
    job: Job,
    columns: Sequence[str] | None,
    scrub: _Scrubber,
    status: Any = None,
) -> tuple[int, list[str]]:
    """Store what came back for one sample; mark every asked input delivered or failed.

    Returns the number of files stored and the user-facing lines: one for a sample-level failure, one per
    input that did not come back from a transform that otherwise completed.
    """
    qhash = query_hash(job.qastle)
    why: str | None = None
    if guard is None:
        why = "no result from the ServiceX client"
    elif not _valid(guard):
        try:
            guard[0]
        except Exception as err:
            why = _sample_message(err, scrub)
    elif status is not None and str(getattr(status.status, "value", status.status)) != "Complete":
        state = str(getattr(status.status, "value", status.status))
        why = (
            f"transform failed on ServiceX: it ended {state!r} "
            f"({status.files_completed} of {status.files} file(s) done)"
        )
    if why is not None:
        for f in p.todo:
            record_failure(manifest, p, f, why)
        return 0, [f"{why}; {len(p.todo)} input file(s) not delivered"]
    found, unmatched = match_outputs(list(guard), [f.path for f in p.todo])
    if unmatched:
        log.warning("%s: %d returned file(s) match no input: %s", job.sample.name, len(unmatched), unmatched[:3])
    stored, lines = 0, []
    for f in p.todo:
        local = found.get(f.path)
        if local is None:
            why = "the transform of this file failed on ServiceX (re-run to fetch only the missing files)"
            record_failure(manifest, p, f, why)
            lines.append(f"{f.path}: {why}")
            continue
        try:
            store_output(manifest, p, f, Path(local), query_sha256=qhash, expected_columns=columns)
            stored += 1
        except DeliveryError as err:
            why = f"returned file rejected: {scrub(str(err))}"
            record_failure(manifest, p, f, why)
            lines.append(f"{f.path}: {why}")
    return stored, lines


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
) -> DeliveryReport:
    """Deliver every catalogue sample through ServiceX with the skim query (all samples in one request)."""
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
    )


def deliver_from_config(
    path: Path,
    *,
    servicex_config: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> DeliveryReport:
    """Deliver a servicex-databinder style YAML through the same code path (its queries parsed, never run)."""
    cfg = load_databinder_config(Path(path))
    return deliver_jobs(
        cfg.jobs,
        cfg.output_dir,
        servicex_config=servicex_config,
        endpoint=cfg.endpoint,
        ignore_cache=cfg.ignore_cache,
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
