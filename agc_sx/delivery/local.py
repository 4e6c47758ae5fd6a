"""``agc-sx deliver --backend local``: run the skim query on the catalogue's files without a server.

Each input file goes through :func:`agc_sx.query.execute` - the func-adl-uproot path of the ServiceX uproot
transformer - with the very qastle text ServiceX would receive, and becomes one parquet file in the shared
layout (:mod:`agc_sx.delivery.common`). Worker processes only compute and write a ``*.part`` file; the parent
verifies, renames and records every output, so the manifest has a single writer and the result does not
depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from pathlib import Path

from ..catalogue import Catalog, InputFile
from ..query import execute, query_hash, query_text
from ..utils import PARTIAL_SUFFIX
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
    write_parquet,
)

BACKEND = "local"

#: (sample name, input file, plan) of one unit of work.
_Task = tuple[str, InputFile, Plan]
#: (rows or None, one-line error or None, seconds) returned by a worker.
_Result = tuple[int | None, str | None, float]


def run_one(qastle: str, path: str, tree: str, out: str) -> _Result:
    """Execute ``qastle`` on ``path`` and write the result to ``out``; never raises (errors are one line).

    Module-level so that spawned worker processes can import it. Exceptions are returned as text because
    some reader exceptions do not survive pickling back to the parent.
    """
    start = time.perf_counter()
    try:
        array = execute(qastle, path, tree)
        write_parquet(array, Path(out))
        return len(array), None, time.perf_counter() - start
    except Exception as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else ""
        return None, f"{type(err).__name__}: {first}" if first else type(err).__name__, time.perf_counter() - start


def _partial_path(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def deliver_local(
    catalog: Catalog,
    output_dir: Path,
    *,
    workers: int = 1,
    force: bool = False,
    quiet: bool = False,
    tree: str = "Events",
) -> DeliveryReport:
    """Skim every input file of ``catalog`` into ``output_dir`` (one parquet per input) and return the report.

    Finished outputs of the same query are reused unless ``force``. An input that cannot be read is recorded
    as failed (its sample ``incomplete``) and the other inputs are still delivered. ``workers > 1`` runs
    files in a process pool (started by a fork server, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard); func-adl-uproot's fixed cost per file (dask graph, ~2-5 s for a
    947-branch CMS NanoAOD tree) is what a pool hides.
    """
    if workers < 1:
        raise DeliveryError(f"--workers must be at least 1, got {workers}")
    check_dirnames(catalog)
    text = query_text(tree)
    sha = query_hash(text)
    with open_delivery(Path(output_dir), text, sha) as manifest:
        plans = {s.name: plan(manifest, s, sha, force, backend=BACKEND) for s in catalog}
        manifest.save()
        tasks: list[_Task] = [(name, f, p) for name, p in plans.items() for f in p.todo]
        remaining = {name: len(p.todo) for name, p in plans.items()}
        delivered = 0

        with ExitStack() as stack:
            # the pool first: forked workers must not inherit the progress bar's thread
            pool = _pool(stack, workers, len(tasks))
            advance = _progress(stack, plans, quiet)
            for p in plans.values():
                if not p.todo:
                    finish_sample(manifest, p)
            for (name, input_file, p), part, result in _run(tasks, manifest.base, text, tree, pool):
                _rows, error, _seconds = result
                if error is None:
                    try:
                        store_output(manifest, p, input_file, part, query_sha256=sha, move=True)
                        delivered += 1
                    except DeliveryError as err:
                        record_failure(manifest, p, input_file, err)
                else:
                    record_failure(manifest, p, input_file, error)
                part.unlink(missing_ok=True)
                remaining[name] -= 1
                advance(name)
                if remaining[name] == 0:
                    finish_sample(manifest, p)
        reused = sum(len(p.done) for p in plans.values())
        return DeliveryReport.from_manifest(manifest, plans, delivered=delivered, reused=reused)


def _pool(stack: ExitStack, workers: int, n_tasks: int) -> ProcessPoolExecutor | None:
    """A process pool for ``workers > 1`` (None: run in this process).

    On Linux the workers come from a fork server that has imported the readers once (each fork then starts
    in milliseconds, and this process's threads - fsspec's I/O loop, rich's refresh - are not inherited);
    elsewhere they are spawned, each importing awkward/uproot/dask again.
    """
    if workers == 1 or n_tasks <= 1:
        return None
    if sys.platform == "linux":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "uproot", "dask_awkward", "func_adl_uproot"])
    else:
        context = multiprocessing.get_context("spawn")
    return stack.enter_context(ProcessPoolExecutor(max_workers=min(workers, n_tasks), mp_context=context))


def _run(
    tasks: list[_Task], base: Path, qastle: str, tree: str, pool: ProcessPoolExecutor | None
) -> Iterator[tuple[_Task, Path, _Result]]:
    """Run the tasks in this process or in ``pool``; yield each with its ``*.part`` file as it finishes."""
    parts = [_partial_path(p.target(base, f)) for _, f, p in tasks]
    if pool is None:
        for task, part in zip(tasks, parts, strict=True):
            yield task, part, run_one(qastle, task[1].path, tree, str(part))
        return
    futures: dict[Future[_Result], tuple[_Task, Path]] = {
        pool.submit(run_one, qastle, task[1].path, tree, str(part)): (task, part)
        for task, part in zip(tasks, parts, strict=True)
    }
    try:
        for future in as_completed(futures):
            task, part = futures[future]
            try:
                result = future.result()
            except Exception as err:  # a worker that died (e.g. killed by the OOM killer)
                result = (None, f"worker failed: {type(err).__name__}: {err}", 0.0)
            yield task, part, result
    finally:
        for future in futures:
            future.cancel()


def _progress(stack: ExitStack, plans: dict[str, Plan], quiet: bool) -> Callable[[str], None]:
    """One rich progress bar per sample (on stderr); a no-op when ``quiet``."""
    if quiet:
        return lambda name: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = stack.enter_context(
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
    )
    ids = {
        name: progress.add_task(name, total=len(p.done) + len(p.todo), completed=len(p.done))
        for name, p in plans.items()
    }
    return lambda name: progress.advance(ids[name])
