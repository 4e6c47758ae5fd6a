"""Read servicex-databinder style YAML (the AGC notebook's ``servicex_config.yaml``) into delivery jobs.

The FuncADL text of each sample is *parsed* (Python ``ast`` then qastle), never evaluated, and checked by the
func-adl-uproot translator, so a query that would only fail on the server is rejected here with one line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..catalogue import InputFile, Sample
from ..constants import XSEC_PB
from ..errors import ConfigError
from ..utils import first_line
from .common import Job

DEFAULT_OUTPUT_DIR = "outputs_databinder"



@dataclass(frozen=True)
class DatabinderConfig:
    """A servicex-databinder YAML, parsed: the jobs and its General section."""
    jobs: tuple[Job, ...]
    endpoint: str | None
    output_dir: Path
    ignore_cache: bool


_ROOT_NAMES = {"EventDataset"}
#: Operators allowed on the event stream itself (lambdas inside may use anything func_adl_uproot translates).
_OPERATORS = frozenset(
    ["Select", "SelectMany", "Where", "Take", "Skip", "First", "Count", "Min", "Max", "Sum", "Any", "All", "Choose", "Concat", "Zip", "OrderBy", "OrderByDescending", "Aggregate", "Distinct"]
)


#: Functions a query may call by name: func-adl-uproot passes a called name into the Python it generates and
#: the transformer runs, so anything else (``open``, ``eval``, ``__import__`` ...) must never reach a server.
_FUNCTIONS = frozenset(
    ["EventDataset", "abs", "sqrt", "exp", "log", "sin", "cos", "tan", "arctan2", "atan2", "sinh", "cosh", "tanh"]
)
#: The syntax of a func_adl query: expressions, lambdas, literals; no comprehensions, f-strings, walrus ...
_NODES = (
    ast.Module, ast.Expr, ast.Call, ast.Attribute, ast.Name, ast.Constant, ast.Lambda, ast.arguments, ast.arg,
    ast.Dict, ast.List, ast.Tuple, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript,
    ast.Slice, ast.Load, ast.operator, ast.unaryop, ast.boolop, ast.cmpop,
)


def _check_vocabulary(module: ast.Module) -> None:
    """Refuse anything outside func_adl: calls of builtins, free names, dunder attributes, other syntax."""
    params = {a.arg for node in ast.walk(module) if isinstance(node, ast.Lambda) for a in node.args.args}
    for node in ast.walk(module):
        if not isinstance(node, _NODES):
            raise ValueError(f"{type(node).__name__} is not part of a func_adl query")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in _FUNCTIONS:
            raise ValueError(f"calling {node.func.id}() is not part of a func_adl query")
        if isinstance(node, ast.Name) and node.id not in params and node.id not in _FUNCTIONS:
            raise ValueError(f"the name {node.id!r} is neither a lambda argument nor a func_adl function")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ValueError(f"refusing the name {node.attr!r}")


def funcadl_to_qastle(text: str, tree: str = "Events") -> str:
    """Turn a databinder ``FuncADL`` string into qastle without evaluating it; ValueError on anything odd.

    Accepted forms: ``Select(...).Where(...)`` (rooted at the tree), ``FromTree('T').Select(...)``, or a full
    ``EventDataset('x.root', 'T').Select(...)``. Multi-line text is fine (it is parsed as one expression).
    """
    import qastle
    from func_adl_uproot.translation import generate_python_source

    body = text.strip()
    if not body:
        raise ValueError("empty FuncADL query")
    if body.startswith("FromTree("):
        try:
            head = ast.parse(body.split(")", 1)[0] + ")", mode="eval").body
        except SyntaxError:
            raise ValueError("FromTree(...) must name the tree as a string, e.g. FromTree('Events')") from None
        if not (
            isinstance(head, ast.Call)
            and len(head.args) == 1
            and isinstance(head.args[0], ast.Constant)
            and isinstance(head.args[0].value, str)
        ):
            raise ValueError("FromTree(...) must name the tree as a string, e.g. FromTree('Events')")
        tree = head.args[0].value
        body = body.split(")", 1)[1].lstrip()
        if not body.startswith("."):
            raise ValueError("FromTree('T') must be followed by .Select/.Where/...")
        body = body[1:]
    if not body.startswith("EventDataset("):
        body = f"EventDataset('bogus.root', {tree!r})." + body
    try:
        module = ast.parse("(\n" + body + "\n)")
    except SyntaxError as err:
        raise ValueError(f"does not parse as Python ({err.msg})") from None
    if len(module.body) != 1 or not isinstance(module.body[0], ast.Expr):
        raise ValueError("must be a single expression")
    _check_vocabulary(module)
    root: ast.AST = module.body[0].value
    while isinstance(root, ast.Call) and isinstance(root.func, ast.Attribute):
        if root.func.attr not in _OPERATORS:
            raise ValueError(f"unknown func_adl operator {root.func.attr!r} on the event stream")
        root = root.func.value
    if not (isinstance(root, ast.Call) and isinstance(root.func, ast.Name) and root.func.id in _ROOT_NAMES):
        raise ValueError("must be a chain of func_adl operators (Select, Where, ...) on the event tree")
    try:
        text_ast = qastle.python_ast_to_text_ast(qastle.insert_linq_nodes(module))
        generate_python_source(text_ast)  # translation only (no exec): rejects what the transformer cannot run
    except Exception as err:  # qastle / func-adl-uproot raise plain exceptions of many kinds
        detail = " ".join(str(err).split())
        raise ValueError(f"not a valid func_adl query ({type(err).__name__}: {detail})") from None
    return str(text_ast)


def _files_of(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        files = [f.strip() for f in value.split(",")]
    elif isinstance(value, list) and all(isinstance(f, str) for f in value):
        files = [f.strip() for f in value]
    else:
        raise ConfigError(f"{where}: XRootDFiles must be a path or a list of paths")
    files = [f for f in dict.fromkeys(files) if f]  # the server counts a repeated path once and never finishes
    if not files:
        raise ConfigError(f"{where}: XRootDFiles is empty")
    return files


def _nevts(path: str, tree: str, known: dict[str, int], where: str) -> int:
    """Unskimmed event count: from the bundled catalogue when it lists the file, else read from the file."""
    if path in known:
        return known[path]
    try:
        import uproot

        with uproot.open({path: None}, timeout=30) as f:
            return int(f[tree].num_entries)
    except Exception as err:
        raise ConfigError(
            f"{where}: cannot count the events of {path} ({type(err).__name__}: {err}); "
            "normalisation needs them (put the file in a catalogue and use --catalog instead)"
        ) from None


def _known_counts() -> dict[str, int]:
    try:
        from ..catalogue import load_catalog

        return {f.path: f.nevts for s in load_catalog() for f in s.files}
    except Exception:  # no bundled catalogue: counts come from the files
        return {}


def load_databinder_config(path: Path) -> DatabinderConfig:
    """Parse and validate the YAML; every problem is one :class:`ConfigError` line naming the entry."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Sample"), list) or not doc["Sample"]:
        raise ConfigError(f"{path}: expected 'General' and a non-empty 'Sample' list")
    general = doc.get("General") or {}
    if not isinstance(general, dict):
        raise ConfigError(f"{path}: 'General' must be a mapping")
    fmt = str(general.get("OutputFormat", "parquet")).lower()
    if fmt != "parquet":
        raise ConfigError(f"{path}: OutputFormat {fmt!r} is not supported; agc-sx delivers parquet")
    endpoint = general.get("ServiceXName") or general.get("ServiceXBackendName")
    out = Path(str(general.get("OutputDirectory") or DEFAULT_OUTPUT_DIR))
    ignore = bool(general.get("IgnoreServiceXCache", False))
    known: dict[str, int] | None = None
    jobs: list[Job] = []
    names: set[str] = set()
    for i, entry in enumerate(doc["Sample"]):
        where = f"{path}: Sample[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("Name"), str) or not entry["Name"]:
            raise ConfigError(f"{where}: every sample needs a Name")
        name = entry["Name"]
        where = f"{path}: sample {name}"
        if name in names:
            raise ConfigError(f"{where}: duplicate Name")
        names.add(name)
        process, _, variation = name.partition("__")
        variation = variation or "nominal"
        tree = str(entry.get("Tree") or "Events")
        if not isinstance(entry.get("FuncADL"), str):
            raise ConfigError(f"{where}: FuncADL query text is missing")
        try:
            qastle_text = funcadl_to_qastle(entry["FuncADL"], tree)
        except ValueError as err:
            raise ConfigError(f"{where}: FuncADL {err}") from None
        xsec = float(entry.get("XSec", XSEC_PB.get(process, 0.0)))
        has_rucio, has_files = "RucioDID" in entry, "XRootDFiles" in entry
        if has_rucio == has_files:
            raise ConfigError(f"{where}: give exactly one of RucioDID or XRootDFiles")
        if has_rucio:
            did = entry["RucioDID"]
            if not isinstance(did, str) or ":" not in did:
                raise ConfigError(f"{where}: RucioDID must look like 'scope:name'")
            nevts = entry.get("NEvents")
            if not isinstance(nevts, int) or nevts < 0:
                raise ConfigError(f"{where}: a RucioDID sample needs NEvents (unskimmed count) for normalisation")
            files: tuple[InputFile, ...] = (InputFile(did, nevts),)
            jobs.append(Job(Sample(process, variation, files, xsec, nevts), qastle_text, "rucio"))
            continue
        paths = _files_of(entry["XRootDFiles"], where)
        nfiles = entry.get("NFiles")
        if nfiles is not None:
            if not isinstance(nfiles, int) or nfiles < 1:
                raise ConfigError(f"{where}: NFiles must be a positive integer")
            paths = paths[:nfiles]
        if known is None:
            known = _known_counts()
        files = tuple(InputFile(p, _nevts(p, tree, known, where)) for p in paths)
        jobs.append(
            Job(Sample(process, variation, files, xsec, sum(f.nevts for f in files)), qastle_text, "filelist")
        )
    return DatabinderConfig(tuple(jobs), str(endpoint) if endpoint else None, out, ignore)
