"""``agc-sx deliver --backend servicex``: run the skim on a ServiceX deployment and store what comes back.

Built on the servicex 3.3 client (``servicex.deliver``), with the gaps it leaves closed here
(the behaviour of the client and of the real server side this relies on is listed in the README):

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

import contextlib
import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...catalogue import Catalog, InputFile
from ...errors import ConfigError, Interrupted, ServerLost, ServiceXError
from ...manifest import Manifest
from ...options import DATASET_TYPES, one_of
from ...query import OUTPUT_COLUMN_NAMES
from ...utils import sha256_text, sigint_ignored
from ..common import DeliveryReport, Job, Plan, check_dirnames, finish_sample, open_delivery, plan
from ..databinder_config import load_databinder_config
from ._scrub import _Scrubber
from .client import _final_statuses, _run_client, _stale
from .common import BACKEND, _Request, _valid
from .endpoint import Endpoint, _cache_dir, preflight, resolve_endpoint
from .naming import _titles, match_outputs
from .settle import _collect, _fatal_message, _settle_unfinished
from .watcher import WATCH_INTERVAL_S, _Store, _subfolders, _Watcher

_RUCIO_DID = re.compile(r"[\w.\-]+:(?!//)\S+")


def _check_dataset_ids(jobs: Sequence[Job]) -> None:
    """Refuse, before anything is submitted, dataset ids the client or server would reject."""
    for job in jobs:
        if (problem := one_of("dataset type", job.dataset_type, DATASET_TYPES)) is not None:
            raise ServiceXError(f"{job.sample.name}: {problem}")
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


@dataclass
class _Run:
    """One ``deliver_jobs`` call: where it talks to, what it asked for, and what it has stored so far."""

    jobs: Sequence[Job]
    ep: Endpoint
    scrub: _Scrubber
    cache: Path
    plans: dict[str, Plan]
    requests: dict[str, _Request]
    store: _Store
    earlier: set[str]  # transforms of earlier runs in the client's cache: what it may hand back
    started: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=60)
    )


def _plan(manifest: Manifest, jobs: Sequence[Job], force: bool) -> tuple[dict[str, Plan], dict[str, _Request]]:
    """What is already delivered (reused) and what to ask the server for, per sample and request title."""
    plans = {
        job.sample.name: plan(manifest, job.sample, sha256_text(job.qastle), force, backend=BACKEND,
                              datasets=job.dataset_type != "filelist")
        for job in jobs
    }
    manifest.save()
    return plans, {r.title: r for r in _requests(jobs, plans)}


def _spec(requests: dict[str, _Request], wanted: Sequence[str], ignore_cache: bool) -> dict[str, Any]:
    """The ``servicex.deliver`` specification of the ``wanted`` requests (parquet, into the local cache)."""
    from servicex.query import FuncADL_Uproot

    samples = []
    for title in wanted:
        query = FuncADL_Uproot()
        query.set_provided_qastle(requests[title].job.qastle)
        samples.append(
            {"Name": title, "Dataset": requests[title].dataset(), "Query": query, "IgnoreLocalCache": ignore_cache}
        )
    return {"General": {"OutputFormat": "parquet", "Delivery": "LocalCache"}, "Sample": samples}


def _submit(run: _Run, *, ignore_cache: bool, quiet: bool, progressive: bool,
            watch_interval: float) -> dict[str, Any]:
    """Run the client (with the watcher storing files as they land) and return its result per title.

    A second call, bypassing the client's cache, asks for what the cache cannot give: files deleted since,
    or a transform the server no longer knows (redeployed without its database). Ctrl-C and a lost or
    refusing server end the delivery here, with what was stored recorded and the rest marked missing.
    """
    pending = list(run.requests)
    results: dict[str, Any] = {}
    watching = progressive and bool(pending)
    watcher = _Watcher(run.store, run.cache, run.requests, run.earlier, watch_interval) if watching else None
    manifest = run.store.manifest
    try:
        with watcher if watcher is not None else contextlib.nullcontext():
            for _attempt in range(2):
                if not pending:
                    break
                got = _run_client(_spec(run.requests, pending, ignore_cache), run.ep, run.cache, quiet, run.scrub)
                results.update(got)
                pending = [t for t in pending if _stale(got.get(t))]
                ignore_cache = True
    except KeyboardInterrupt:  # what was stored stays recorded: verified, reused next time
        with sigint_ignored():  # a second Ctrl-C must not break the manifest write into a traceback
            _settle_unfinished(run.store, run.plans, run.jobs, "delivery interrupted (Ctrl-C)")
        raise Interrupted(
            f"interrupted: {run.store.delivered} file(s) delivered and recorded in {manifest.path}; "
            "run the same command again to fetch the rest"
        ) from None
    except Exception as err:
        message = err.args[0] if isinstance(err, ServerLost) else _fatal_message(err, run.ep, run.scrub)
        _settle_unfinished(run.store, run.plans, run.jobs, message)
        if isinstance(err, ServerLost) or run.store.delivered:
            message += (
                f"; {run.store.delivered} file(s) delivered and recorded, the rest marked missing in "
                f"{manifest.path}: run the same command again to fetch it"
            )
        raise ServiceXError(message) from None
    return results


def _settle(run: _Run, results: dict[str, Any]) -> list[str]:
    """Store what the client returned and the watcher has not, record the rest as failed; the user's lines."""
    ask = [
        t for t, r in run.requests.items()
        if _valid(results.get(t)) and (r.did is not None or len(results[t]) < len(r.inputs))
    ]
    statuses = _final_statuses(run.ep, run.cache, ask, run.started) if ask else {}
    failures: list[str] = []
    with run.store.lock:
        for title, r in run.requests.items():
            lines = _collect(run.store, r, results.get(title), statuses.get(title), run.earlier)
            failures.extend(f"{r.job.sample.name}: {line}" for line in lines)
        for job in run.jobs:
            finish_sample(run.store.manifest, run.plans[job.sample.name])
    return failures


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
    """Deliver ``jobs`` in one ``servicex.deliver`` call into ``output_dir``: plan, submit, settle.

    Args:
        jobs: the samples with their query and dataset type.
        output_dir: the delivery folder (layout and manifest of :mod:`agc_sx.delivery.common`).
        servicex_config: ``servicex.yaml`` to use instead of the client's search.
        endpoint: the endpoint's name in it (default: its default endpoint).
        ignore_cache: do not reuse the client's cached transforms.
        force: redo every output, also those already delivered with this query.
        quiet: no progress bars.
        skim_columns: check every stored file against the skim's columns (off for a user's own query).
        progressive: store (verify and record) each file as soon as the client has downloaded it, so that a
            reader of the manifest (``agc-sx run``) can start on it; the end result is the same.
        watch_interval: how often the client's download folder is looked at.
    """
    output_dir = Path(output_dir)
    _check_dataset_ids(jobs)
    check_dirnames(Catalog(tuple(job.sample for job in jobs)))
    ep = resolve_endpoint(servicex_config, endpoint)
    scrub = _Scrubber([ep.token])
    preflight(ep, scrub)

    texts = {job.qastle for job in jobs}
    text = next(iter(texts)) if len(texts) == 1 else None
    columns = OUTPUT_COLUMN_NAMES if skim_columns else None
    with open_delivery(output_dir, text, sha256_text(text) if text is not None else None) as manifest:
        if text is None:
            manifest.extra["queries"] = {job.sample.name: job.qastle for job in jobs}
        plans, requests = _plan(manifest, jobs, force)
        cache = _cache_dir(output_dir, ep)
        run = _Run(jobs, ep, scrub, cache, plans, requests, _Store(manifest, columns, scrub), _subfolders(cache))
        results = _submit(run, ignore_cache=ignore_cache, quiet=quiet, progressive=progressive,
                          watch_interval=watch_interval)
        failures = _settle(run, results)
        reused = sum(len(p.done) for p in plans.values())
        return DeliveryReport(manifest, [job.sample.name for job in jobs], failures, run.store.delivered, reused)


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

    Args:
        catalog: the samples and their input files or dataset ids.
        output_dir: the delivery folder (``manifest.json``, one subfolder per sample, the client's cache).
        servicex_config: ``servicex.yaml`` to use instead of the client's usual search.
        endpoint: endpoint name in the configuration; default its default endpoint.
        ignore_cache: do not reuse the client's cached transforms.
        dataset_type: the catalogue's paths are files (``filelist``), Rucio DIDs or CERN Open Data record ids.
        force: redo every output, even those already delivered with this query.
        quiet: no progress bars.
        progressive: record each output as soon as it has been downloaded (see the module docstring).
    """
    from ...query import query_text

    if (problem := one_of("dataset type", dataset_type, DATASET_TYPES)) is not None:
        raise ServiceXError(problem)
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
