"""``agc-sx deliver --backend local``: run the skim query on the catalogue's files without a server.

The skim is the very qastle ServiceX receives, turned into Python by func-adl-uproot (the code generator of
the ServiceX uproot transformer). That generated code is written against dask-awkward; building and
optimising its graph costs 1-5 s per file on a 947-branch NanoAOD tree, more than reading the file. So the
graph is built *once per branch layout*: dask-awkward's column optimisation on the first file of a layout
says which branches the query reads, and every file of that layout then runs the same generated code eagerly
on exactly those branches (``dask_awkward`` bound to ``awkward``, whose functions it mirrors, and
``uproot.dask`` to the branches just read). The output is bit-identical to the dask path
(:func:`agc_sx.query.execute`, which the tests compare against).

Worker processes read, skim, write and check a ``*.part`` file (:func:`~.common.verify_written`: the array in
memory, the file's footer); the parent renames and records every output, so the manifest has a single writer
and the result does not depend on the number of workers.
Remote inputs (``root://``, ``https://``) are read through :class:`agc_sx.remote.NetworkSource`: retried
with back-off, failures in one line.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import awkward as ak

from .. import remote
from ..catalogue import Catalog, InputFile
from ..errors import Interrupted
from ..query import query_text
from ..utils import PARTIAL_SUFFIX, sha256_file, sha256_text, sigint_ignored
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
    verify_written,
    write_parquet,
)

BACKEND = "local"

#: A tree's branch layout: (tree name, ((branch name, C++ type name), ...)).
Layout = tuple[str, tuple[tuple[str, str], ...]]

#: (sample name, input file, plan) of one unit of work.
_Task = tuple[str, InputFile, Plan]


class _Result(NamedTuple):
    """What a worker hands back for one input: never an exception (some do not survive pickling)."""

    part: str | None  # the written and verified *.part file
    rows: int | None
    sha256: str | None
    error: str | None  # one line
    seconds: float
    bytes_read: int  # requested from the input's source (the network, for a remote file)


def default_workers() -> int:
    """Files in parallel when not told: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- the query, compiled once per branch layout ----------------------------------------------------------------


class _EagerUproot(types.ModuleType):
    """``uproot`` as the generated code sees it when run eagerly: ``uproot.dask`` returns the branches read."""

    def __init__(self, events: ak.Array) -> None:
        super().__init__("uproot")
        self._events = events

    def dask(self, *args: Any, **kwargs: Any) -> ak.Array:
        return self._events

    def __getattr__(self, name: str) -> Any:
        import uproot

        return getattr(uproot, name)


class Skim:
    """The func-adl-uproot code of one qastle query: traced with dask-awkward once per branch layout, run
    eagerly on every file.
    """

    def __init__(self, qastle: str, tree: str = "Events") -> None:
        from func_adl_uproot.translation import generate_python_source

        from ..query import QueryError

        try:
            source = generate_python_source(qastle)
        except Exception as err:  # qastle parse errors and unsupported constructs come as many types
            raise QueryError(f"cannot translate the query: {type(err).__name__}: {err}") from None
        suffix = ".compute()\n"
        if not source.endswith(suffix):  # the generator's contract: one expression, computed at the end
            raise QueryError("func-adl-uproot generated code of an unknown shape; cannot run it eagerly")
        # the same function, returning the dask-awkward collection instead of computing it
        self._code = compile(source[: -len(suffix)] + "\n", "<func-adl-uproot query>", "exec")
        self.tree = tree
        self._columns: dict[Layout, list[str]] = {}

    def _function(self, uproot_module: types.ModuleType | None) -> Callable[..., Any]:
        """The generated ``run_query``; with ``uproot_module``, its imports bound for eager evaluation."""
        namespace: dict[str, Any] = {}
        scope: dict[str, Any] = {}
        if uproot_module is not None:
            real_import = builtins.__import__

            def eager_import(name: str, *args: Any, **kwargs: Any) -> Any:
                if name == "dask_awkward":
                    return ak
                if name == "uproot":
                    return uproot_module
                return real_import(name, *args, **kwargs)

            scope["__builtins__"] = {**builtins.__dict__, "__import__": eager_import}
        exec(self._code, scope, namespace)
        return namespace["run_query"]

    @property
    def layouts(self) -> dict[Layout, list[str]]:
        """The branches read per layout traced so far (to hand to other processes)."""
        return dict(self._columns)

    def learn(self, layouts: dict[Layout, list[str]]) -> None:
        """Take over layouts traced elsewhere (by the parent, in a run of its own)."""
        self._columns.update(layouts)

    def columns(self, path: str, tree: Any) -> list[str]:
        """The branches the query reads from files with ``tree``'s layout (dask-awkward's optimisation)."""
        import dask_awkward as dak

        layout = (self.tree, tuple((b.name, b.typename) for b in tree.itervalues(recursive=True)))
        if layout not in self._columns:
            collection = remote.RetryPolicy.from_env().call(lambda: self._function(None)(path, self.tree), path)
            needed: set[str] = set()
            for columns in dak.necessary_columns(collection).values():
                needed.update(columns or ())
            self._columns[layout] = sorted(needed)
        return self._columns[layout]

    def __call__(self, path: str, nevts: int | None = None) -> tuple[ak.Array, int]:
        """(the skim of ``path``, bytes read); refuses a file whose entries differ from the catalogue's ``nevts``."""
        import uproot

        with uproot.open(path, **remote.uproot_options()) as file:
            try:
                tree = file[self.tree]
            except KeyError:
                raise DeliveryError(f"no tree {self.tree!r} in the file") from None
            if nevts is not None and tree.num_entries != nevts:
                raise DeliveryError(f"the file has {tree.num_entries:,} entries, the catalogue says {nevts:,}")
            events = tree.arrays(self.columns(path, tree), library="ak")
            result = self._function(_EagerUproot(events))(path, self.tree)
            return (result if isinstance(result, ak.Array) else ak.Array(result)), remote.bytes_read(file)


@functools.lru_cache(maxsize=4)
def skim(qastle: str, tree: str = "Events") -> Skim:
    """The :class:`Skim` of ``qastle``, one per process (its layouts cached with it)."""
    return Skim(qastle, tree)


# --- one file --------------------------------------------------------------------------------------------------


def describe_failure(err: BaseException, path: str) -> str:
    """One line a person understands for a failed input: network, certificate, format, or the reader's own."""
    if isinstance(err, DeliveryError):
        return str(err)
    reason = remote.explain(err, path)
    if reason is not None:
        return reason.removeprefix(f"{path}: ")  # the report names the file already
    header = remote.root_header_problem(path)
    if header is not None:
        return header
    text = str(err).strip()
    first = " ".join(text.split()) if text and len(text) < 300 else (text.splitlines()[0] if text else "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def run_one(qastle: str, path: str, tree: str, target: str, nevts: int | None = None,
            layouts: dict[Layout, list[str]] | None = None) -> _Result:
    """Skim ``path`` into a new, verified ``*.part`` file beside ``target``; never raises (errors are one line).

    Module-level so that worker processes can import it. The part file exists only while it is written or
    once it is complete; an interrupted call removes it. ``layouts``: branches per layout already traced.
    """
    start = time.perf_counter()
    final = Path(target)
    part: Path | None = None
    try:
        compiled = skim(qastle, tree)
        if layouts:
            compiled.learn(layouts)
        array, nbytes = compiled(path, nevts)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=PARTIAL_SUFFIX, dir=final.parent)
        os.close(fd)
        part = Path(name)
        rows = verify_written(part, write_parquet(array, part))  # here, in parallel, not in the parent
        digest = sha256_file(part)
        done = part
        part = None
        return _Result(str(done), rows, digest, None, time.perf_counter() - start, nbytes)
    except Exception as err:
        return _Result(None, None, None, describe_failure(err, path), time.perf_counter() - start, 0)
    finally:
        if part is not None:  # failed or interrupted while writing
            part.unlink(missing_ok=True)


# --- the delivery ----------------------------------------------------------------------------------------------


def deliver_local(
    catalog: Catalog,
    output_dir: Path,
    *,
    workers: int | None = None,
    force: bool = False,
    quiet: bool = False,
    tree: str = "Events",
) -> DeliveryReport:
    """Skim every input file of ``catalog`` into ``output_dir`` (one parquet per input) and return the report.

    Finished outputs of the same query are reused unless ``force``. An input that cannot be read, or whose
    entries differ from the catalogue's ``nevts``, is recorded as failed (its sample ``incomplete``) and the
    other inputs are still delivered. ``workers`` (default: every core) files run in parallel in a process
    pool started by a fork server, so a script calling this needs the usual ``if __name__ == "__main__":``
    guard. Ctrl-C stops the workers, removes what they were writing, records what was delivered and raises
    :class:`~agc_sx.errors.Interrupted`; the next run delivers the rest.

    Args:
        catalog: the samples and their input files (local paths, ``root://``, ``https://``).
        output_dir: the delivery folder (``manifest.json`` and one subfolder per sample).
        workers: files skimmed in parallel; default one per core.
        force: redo every output, even those already delivered with this query.
        quiet: no progress bar.
        tree: the input files' TTree.
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DeliveryError(f"--workers must be at least 1, got {workers}")
    check_dirnames(catalog)
    text = query_text(tree)
    sha = sha256_text(text)
    with open_delivery(Path(output_dir), text, sha) as manifest:
        plans = {s.name: plan(manifest, s, sha, force, backend=BACKEND) for s in catalog}
        manifest.save()
        tasks: list[_Task] = [(name, f, p) for name, p in plans.items() for f in p.todo]
        remaining = {name: len(p.todo) for name, p in plans.items()}
        folders = {p.target(manifest.base, f).parent for _, f, p in tasks}
        delivered = 0
        nbytes = 0
        pool: ProcessPoolExecutor | None = None
        try:
            with ExitStack() as stack:
                # the pool first: forked workers must not inherit the progress bar's thread
                pool = _pool(stack, workers, len(tasks), text, tree)
                advance = _progress(stack, plans, quiet)
                for p in plans.values():
                    if not p.todo:
                        finish_sample(manifest, p)
                for (name, input_file, p), result in _run(tasks, manifest.base, text, tree, pool):
                    nbytes += result.bytes_read if remote.is_remote(input_file.path) else 0
                    ok = False
                    if result.error is None and result.part is not None:
                        assert result.rows is not None and result.sha256 is not None
                        try:
                            store_output(manifest, p, input_file, Path(result.part), query_sha256=sha, move=True,
                                         verified=(result.rows, result.sha256))
                            delivered += 1
                            ok = True
                        except DeliveryError as err:
                            record_failure(manifest, p, input_file, err)
                        finally:
                            Path(result.part).unlink(missing_ok=True)
                    else:
                        record_failure(manifest, p, input_file, result.error or "not delivered")
                    remaining[name] -= 1
                    advance(name, ok)
                    if remaining[name] == 0:
                        finish_sample(manifest, p)
        except KeyboardInterrupt:
            with sigint_ignored():  # a second Ctrl-C must not break the manifest write into a traceback
                _stop_workers(pool)
                _remove_partials(folders)
                for name, p in plans.items():
                    if remaining[name]:
                        for f in p.todo:
                            if p.record.output_for(f.path) is None:
                                p.record.set_failed(f.path, f.nevts, "interrupted (Ctrl-C) before it was delivered")
                        finish_sample(manifest, p)
            raise Interrupted(
                f"interrupted: {delivered} file(s) delivered and recorded in {manifest.base / 'manifest.json'}; "
                "run the same command again to deliver the rest"
            ) from None
        reused = sum(len(p.done) for p in plans.values())
        report = DeliveryReport.from_manifest(manifest, plans, delivered=delivered, reused=reused)
        report.bytes_read = nbytes
        return report


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them and cleans up (no traceback from each worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare(qastle: str, tree: str) -> None:
    """Translate the query and import what tracing it needs here, once, so that forked workers inherit both."""
    import dask_awkward  # noqa: F401
    import vector  # noqa: F401

    skim(qastle, tree)


def _pool(stack: ExitStack, workers: int, n_tasks: int, qastle: str, tree: str) -> ProcessPoolExecutor | None:
    """A process pool for ``workers > 1`` (None: run in this process).

    On Linux the workers are forked from this process when it runs no other thread (the command line: they
    start at once, with everything imported), else from a fork server that has imported the readers once (so
    that no thread - fsspec's I/O loop, rich's refresh, a caller's - is inherited half-way); elsewhere they
    are spawned, each importing awkward/uproot again.
    """
    if workers == 1 or n_tasks <= 1:
        return None
    _prepare(qastle, tree)
    context: multiprocessing.context.BaseContext
    # no thread to inherit (the XRootD client's are not Python's, so it must not be loaded): start at once
    if sys.platform == "linux" and threading.active_count() == 1 and "XRootD" not in sys.modules:
        context = multiprocessing.get_context("fork")
    elif sys.platform == "linux":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "uproot", "dask_awkward", "func_adl_uproot", "vector"])
    else:
        context = multiprocessing.get_context("spawn")
    return stack.enter_context(ProcessPoolExecutor(max_workers=min(workers, n_tasks), mp_context=context,
                                                   initializer=_ignore_sigint))


def _stop_workers(pool: ProcessPoolExecutor | None) -> None:
    """Kill the workers now (they may be in the middle of a file) and wait until they are gone."""
    if pool is None:
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(5)


def _remove_partials(folders: set[Path]) -> None:
    """Remove the ``*.part`` files of this run's sample folders (what killed workers were writing)."""
    for folder in folders:
        for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
            p.unlink(missing_ok=True)


def _run(
    tasks: list[_Task], base: Path, qastle: str, tree: str, pool: ProcessPoolExecutor | None
) -> Iterator[tuple[_Task, _Result]]:
    """Run the tasks in this process or in ``pool``; yield each with its result as it finishes."""
    if pool is None:
        for task in tasks:
            _, f, p = task
            yield task, run_one(qastle, f.path, tree, str(p.target(base, f)), f.nevts)
        return
    layouts = skim(qastle, tree).layouts
    futures: dict[Future[_Result], _Task] = {
        pool.submit(run_one, qastle, f.path, tree, str(p.target(base, f)), f.nevts, layouts): (name, f, p)
        for name, f, p in tasks
    }
    try:
        for future in as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except Exception as err:  # a worker that died (e.g. killed by the OOM killer)
                result = _Result(None, None, None, f"worker failed: {type(err).__name__}: {err}", 0.0, 0)
            yield task, result
    finally:
        for future in futures:
            future.cancel()


def _progress(stack: ExitStack, plans: dict[str, Plan], quiet: bool) -> Callable[[str, bool], None]:
    """One rich progress bar per sample (on stderr), advanced by delivered files only: a failed file is
    counted in the sample's name (``wjets__nominal (1 failed)``), never shown as done. A no-op when ``quiet``.
    """
    if quiet:
        return lambda name, ok: None
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
    failed = dict.fromkeys(ids, 0)

    def advance(name: str, ok: bool) -> None:
        if ok:
            progress.advance(ids[name])
            return
        failed[name] += 1
        progress.update(ids[name], description=f"{name} [red]({failed[name]} failed)[/red]")

    return advance
