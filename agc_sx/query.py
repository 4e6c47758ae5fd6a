"""The skim query as text (qastle) and the one way agc-sx runs qastle on a file.

Every backend sends or runs the *same* qastle: ServiceX receives it as the transform's ``selection``, the local
backend (and the ServiceX test double) hand it to :func:`execute`, which is the code path of the ServiceX
uproot transformer (func-adl-uproot: qastle -> generated Python -> uproot.dask / dask-awkward). So local and
remote delivery can only differ by the machine that runs them.

The query source lives in ``agc_sx/_data/queries/skim.py`` (a real file: func_adl reads lambdas from source),
imported like any other module.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import awkward as ak

from .errors import QueryError
from .resources import DATA_PACKAGE, queries_dir
from .schema import SKIM_COLUMNS
from .utils import atomic_write_text, sha256_text, user_cache_dir

#: The columns the skim returns, in order, with their awkward types as read from real 2015 NanoAOD
#: (:data:`agc_sx.schema.SKIM_COLUMNS`). Counters (``nJet`` ...) are ``uint32`` in CMS files; files written by
#: uproot carry ``int32`` counters, which :data:`COUNTER_TYPES` also accepts.
OUTPUT_COLUMNS: tuple[tuple[str, str], ...] = tuple((name, typ) for name, typ, _ in SKIM_COLUMNS)

#: Column names of the skim, in order.
OUTPUT_COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in OUTPUT_COLUMNS)

#: Integer types accepted for the collection counters.
COUNTER_TYPES: frozenset[str] = frozenset({"uint32", "int32"})

#: Each collection and its counter: the counter must equal the length of every column of the collection.
COUNTERS: dict[str, str] = {"Jet": "nJet", "Electron": "nElectron", "Muon": "nMuon"}


def _load_skim_module() -> ModuleType:
    return importlib.import_module(f"{DATA_PACKAGE}.queries.skim")


@contextlib.contextmanager
def _quiet_func_adl() -> Iterator[None]:
    """func_adl warns 'Method Zip not found' for every dict ``.Zip()``; it is expected, so hide it."""
    logger = logging.getLogger("func_adl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def skim_query(tree: str = "Events") -> Any:
    """The func_adl query object of ``_data/queries/skim.py`` (a servicex ``FuncADL_Uproot`` stream)."""
    with _quiet_func_adl():
        return _load_skim_module().skim_query(tree)


@functools.lru_cache(maxsize=4)
def query_text(tree: str = "Events") -> str:
    """The qastle text of the skim, exactly what is sent to ServiceX (with a dummy input file name).

    Building it imports the servicex client (~1 s, a seventh of a local delivery of 3 M events), so the text
    is kept in the user's cache under a key of everything it is made from: the query's source, the constants
    it uses, the tree and the versions of servicex, func_adl and qastle. A changed input is a new key.
    """
    cache = _query_cache(tree)
    if cache is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = cache.read_text()
            if text.strip():
                return text
    with _quiet_func_adl():
        text = str(skim_query(tree).generate_selection_string())
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, text)
    return text


def _query_cache(tree: str) -> Path | None:
    """Where the qastle of the skim on ``tree`` is cached (``$XDG_CACHE_HOME/agc-sx``), or None if nowhere."""
    from importlib.metadata import PackageNotFoundError, version

    from . import constants

    try:
        versions = [version(p) for p in ("servicex", "func_adl", "qastle")]
        parts = [(queries_dir() / "skim.py").read_text(), Path(constants.__file__).read_text(), tree, *versions]
    except (OSError, PackageNotFoundError):
        return None
    return user_cache_dir() / "qastle" / f"{sha256_text(json.dumps(parts))}.txt"


@functools.lru_cache(maxsize=8)
def compiled(qastle: str) -> Callable[..., Any]:
    """The Python function func-adl-uproot generates for ``qastle``, cached per process."""
    from func_adl_uproot import generate_function

    try:
        return generate_function(qastle)  # type: ignore[no-any-return,unused-ignore]
    except Exception as err:  # qastle parse errors and unsupported constructs come as many types
        raise QueryError(f"cannot translate the query: {type(err).__name__}: {err}") from None


def _check_reader(path: str) -> None:
    """Fail with an actionable message when the URL scheme needs a package that is not installed."""
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    if scheme in ("root", "roots"):
        if not (importlib.util.find_spec("fsspec_xrootd") or importlib.util.find_spec("XRootD")):
            raise QueryError(f"{path}: reading root:// needs fsspec-xrootd (pip install fsspec-xrootd)")
    elif scheme in ("http", "https"):
        if not importlib.util.find_spec("aiohttp"):
            raise QueryError(f"{path}: reading {scheme}:// needs aiohttp (pip install aiohttp)")
    elif scheme not in ("", "file"):
        raise QueryError(f"{path}: unsupported URL scheme {scheme}:// (use a local path, file://, root:// or https://)")


#: dask's configuration is one per process, and ``dask.config.set`` restores on exit what it found on entry:
#: two threads inside it at once leave one computing with the default (threaded) scheduler. Threads take turns.
_DASK_CONFIG_LOCK = threading.Lock()


def execute(qastle: str, path: str, tree: str = "Events") -> ak.Array:
    """Run ``qastle`` on one input file as the ServiceX uproot transformer would, and return its result.

    ``path`` is a local path, ``file://``, ``root://`` (needs fsspec-xrootd) or ``https://`` URL. The dummy
    input name inside the qastle is replaced by ``path``. dask runs synchronously: one file is one partition,
    and worker processes already provide the parallelism (calls from threads of one process run one at a time).
    """
    import dask

    _check_reader(path)
    function = compiled(qastle)
    with _DASK_CONFIG_LOCK, dask.config.set(scheduler="sync"):
        result = function(path, tree)
    if not isinstance(result, ak.Array):
        result = ak.Array(result)
    return result


def empty_skim() -> ak.Array:
    """A zero-length array with every skim column and its type: what an input without passing events gives."""
    import numpy as np

    columns: dict[str, Any] = {}
    for name, typestr in OUTPUT_COLUMNS:
        dtype = np.dtype(typestr.removeprefix("var * "))
        if typestr.startswith("var * "):
            columns[name] = ak.unflatten(np.zeros(0, dtype), np.zeros(0, np.int64))
        else:
            columns[name] = np.zeros(0, dtype)
    return ak.zip(columns, depth_limit=1)


def column_types(array_or_form: Any) -> dict[str, str]:
    """``{field: awkward type string}`` of a record array (or its form), e.g. ``{"Jet_pt": "var * float32"}``."""
    form = array_or_form.layout.form if isinstance(array_or_form, ak.Array) else array_or_form
    record_type = form.type
    return {name: str(content) for name, content in zip(record_type.fields, record_type.contents, strict=True)}


def schema_problems(types: dict[str, str]) -> list[str]:
    """What makes ``types`` (see :func:`column_types`) differ from the skim's columns; empty when it matches."""
    problems = []
    missing = [n for n in OUTPUT_COLUMN_NAMES if n not in types]
    extra = [n for n in types if n not in OUTPUT_COLUMN_NAMES]
    if missing:
        problems.append(f"missing columns {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected columns {', '.join(extra)}")
    for name, want in OUTPUT_COLUMNS:
        got = types.get(name)
        if got is None or got == want:
            continue
        if name in COUNTERS.values() and got in COUNTER_TYPES:
            continue
        problems.append(f"column {name} is {got}, expected {want}")
    return problems
