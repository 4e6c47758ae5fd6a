"""Running the servicex client: our own event loop, Ctrl-C, a heartbeat on the server, its final word."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...errors import ServerLost
from ._scrub import _one_line, _ScrubbedStream, _Scrubber
from .common import _valid, log
from .endpoint import Endpoint, _client_cache_arg


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
            # in a loop of our own that shuts down with the call: the sync wrapper leaves an executor thread
            transforms = asyncio.run(client.get_transforms_async())
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
