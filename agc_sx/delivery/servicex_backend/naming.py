"""Names on both sides: sample titles sent, object names the sidecar gives, our output names."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import PurePosixPath

from ...manifest import safe_component
from ...utils import sha256_text
from .common import _Request

TITLE_LIMIT = 128  # the client truncates longer titles when the server states no limit


DID_NAME_LIMIT = 120  # longest output name stem for the files a dataset id expands into


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


def _titles(names: Sequence[str]) -> list[str]:
    """Unique ServiceX sample titles: the sanitised names, shortened with a hash if too long or repeated."""
    out: list[str] = []
    for name in names:
        t = safe_component(name)
        if len(t) > TITLE_LIMIT or t in out:
            t = t[: TITLE_LIMIT - 9] + "_" + sha256_text(name)[:8]
        out.append(t)
    return out


def _did_output_name(r: _Request, returned: str) -> str:
    """``<sample folder>/<name>.parquet`` for one file a dataset id expanded into, from its object name.

    Long names keep their tail (where the file name is) behind a short hash of the whole name; a name that
    another dataset of the same sample already uses gets a hash of this dataset id.
    """
    stem = returned.removesuffix(".parquet").removesuffix(".root")
    stem = safe_component(stem)
    if len(stem) > DID_NAME_LIMIT:
        stem = f"{sha256_text(returned)[:8]}-{stem[-(DID_NAME_LIMIT - 9):]}"
    record = r.plan.record
    rel = f"{record.dirname}/{stem}.parquet"
    if any(o.file == rel and o.input != r.did for o in record.outputs):
        rel = f"{record.dirname}/{stem}-{sha256_text(str(r.did))[:8]}.parquet"
    return rel
