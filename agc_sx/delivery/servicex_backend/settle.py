"""Settling a run into the manifest: what came back is stored, what did not is recorded with why."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import DeliveryError
from ..common import Job, Plan, finish_sample, record_failure
from ._scrub import _one_line, _Scrubber
from .common import _Request, _state, _valid, log
from .endpoint import Endpoint
from .naming import match_outputs
from .watcher import _Store


def _settle_unfinished(store: _Store, plans: dict[str, Plan], jobs: Sequence[Job], why: str) -> None:
    """After a run that stopped early: every input still missing is recorded as failed with ``why``."""
    with store.lock:
        for job in jobs:
            p = plans[job.sample.name]
            for f in p.todo:
                if p.record.output_for(f.path) is None:
                    p.record.set_failed(f.path, f.nevts, why)
            finish_sample(store.manifest, p)


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
        store.drop(r)
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
        store.drop(r)
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
