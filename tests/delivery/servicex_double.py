"""A ServiceX test double: a real HTTP server on 127.0.0.1 speaking the protocol the servicex 3.3 client uses.

Tests drive the *unpatched* servicex client against it. It implements the calls that client makes
(``GET /servicex``, ``POST /token/refresh``, ``POST /servicex/transformation``, ``GET /servicex/transformation/{id}``,
``GET /servicex/transformation/{id}/results``, ``GET /servicex/datasets/{id}``), stores outputs in an S3 store
(moto's ``ThreadedMotoServer``; bucket = request id, object = input path with ``/`` -> ``:`` plus ``.parquet``), and
*executes* the submitted qastle on the local input files with the same func-adl-uproot path as the local backend,
so a delivery through it can be compared with a local delivery file by file.

Switches on :class:`Behaviour` make it misbehave the ways a real server does: failed files, ``Fatal``,
``Canceled``, ``Bad Dataset``, 400/500 on submission, a refused token refresh (401), slow transforms and results
whose advertised size does not match the object (a short download).

Dataset ids (``rucio://scope:name``, ``cernopendata://12345``) are expanded through ``Behaviour.datasets``, a dict
from the id (without the scheme) to local files, as a DID finder would; an unknown id ends ``Bad Dataset``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import awkward as ak
import boto3
from moto.server import ThreadedMotoServer

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

ACCESS_KEY = "double-access"
SECRET_KEY = "double-secret"


#: The sidecar keeps object names under this length (``transformer_sidecar.transformer.MAX_PATH_LEN``).
MAX_PATH_LEN = 255


def object_name(input_path: str) -> str:
    """The S3 object name the ServiceX sidecar gives the parquet output of one input file.

    As the real sidecar's ``hash_path``: ``/`` -> ``:`` plus ``.parquet``; a longer name than 255 characters
    becomes ``_`` + its sha1 + as much of its tail as fits.
    """
    name = input_path.replace("/", ":") + ".parquet"
    if len(name) <= MAX_PATH_LEN:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()
    return "_" + digest + name[-(MAX_PATH_LEN - len(digest) - 1) :]


def write_result(array: ak.Array, path: str, writer: str = "transformer") -> None:
    """Write one transform result the way a ServiceX producer does.

    ``transformer`` (the default) is the real uproot transformer: ``ak.to_arrow_table`` then a
    ``pq.ParquetWriter`` on that table's schema, so the columns carry awkward extension types.
    ``ak.to_parquet`` is the sidecar's own ROOT -> parquet conversion; ``pyarrow`` a plain arrow producer
    (nullable fields, no awkward metadata).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if writer == "ak.to_parquet":
        ak.to_parquet(array, path)
        return
    if writer == "transformer":
        table = ak.to_arrow_table(array)
    elif writer == "pyarrow":
        plain = ak.to_arrow_table(array, extensionarray=False)
        fields = []
        for f in plain.schema:
            t = f.type
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                t = pa.list_(pa.field("element", t.value_type, nullable=True))
            fields.append(pa.field(f.name, t, nullable=True))
        table = plain.cast(pa.schema(fields)).replace_schema_metadata(None)
    else:
        raise ValueError(f"unknown writer {writer!r}")
    w = pq.ParquetWriter(path, table.schema)
    w.write_table(table)
    w.close()


def _local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _default_executor(qastle: str, path: str, tree: str) -> ak.Array:
    """Run qastle on one file the way the uproot transformer does (agc_sx.query.execute when available)."""
    try:
        from agc_sx.query import execute
    except ImportError:  # the shared query module not written yet: same func-adl-uproot code path
        from func_adl_uproot.translation import generate_function

        return generate_function(qastle)(path, tree)
    return execute(qastle, path, tree=tree)


def make_jwt(exp: float, subject: str = "double-user") -> str:
    """An unsigned-looking JWT with an ``exp`` claim; the client decodes it without verifying."""

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    sig = base64.urlsafe_b64encode(b"not-a-real-signature").rstrip(b"=").decode()
    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64({'sub': subject, 'exp': int(exp)})}.{sig}"


@dataclass
class Behaviour:
    """What the double should do wrong. Titles are the ServiceX sample names (``process__variation``)."""

    failed_files: set[str] = field(default_factory=set)  # input paths whose transform fails
    fatal: set[str] = field(default_factory=set)  # titles that end ``Fatal`` after half their files
    canceled: set[str] = field(default_factory=set)  # titles that end ``Canceled`` after half their files
    bad_dataset: set[str] = field(default_factory=set)  # titles that end ``Bad Dataset`` with no files
    submit_status: dict[str, int] = field(default_factory=dict)  # title -> HTTP status of the submission
    reject_refresh: bool = False  # POST /token/refresh answers 401
    delay: float = 0.0  # seconds per file (slow transforms)
    short_download: set[str] = field(default_factory=set)  # titles whose results advertise too many bytes
    echo_auth: bool = False  # error messages repeat the Authorization header (tests that we scrub it)
    datasets: dict[str, list[str]] = field(default_factory=dict)  # dataset id (no scheme) -> its local files
    gate: threading.Event | None = None  # every transform holds its last file until this is set (60 s at most)
    writer: str = "transformer"  # how results are written (see write_result)


@dataclass
class Transform:
    request_id: str
    request: dict[str, Any]
    files: list[str]
    did_id: int
    unknown_dataset: bool = False
    status: str = "Submitted"
    completed: int = 0
    failed: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # input path -> why it failed
    submit_time: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    finish_time: str | None = None

    @property
    def title(self) -> str:
        return str(self.request.get("title") or "")


class ServiceXDouble:
    """The fake ServiceX deployment. Use as a context manager; ``url`` is its endpoint."""

    def __init__(
        self,
        refresh_token: str | None = "double-refresh-token-s3cr3t",
        executor: Callable[[str, str, str], ak.Array] = _default_executor,
    ) -> None:
        self.refresh_token = refresh_token
        self.executor = executor
        self.behaviour = Behaviour()
        self.transforms: dict[str, Transform] = {}
        self.requests_log: list[tuple[str, str]] = []  # (method, path) of every HTTP call
        self.access_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._s3_server: ThreadedMotoServer | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> ServiceXDouble:
        self._s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._s3_server.start()
        host, port = self._s3_server.get_host_and_port()
        self.s3_endpoint = f"{host}:{port}"
        self.s3 = boto3.client(
            "s3",
            endpoint_url=f"http://{self.s3_endpoint}",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        self._serve(0)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _serve(self, port: int) -> None:
        double = self

        class Handler(_Handler):
            pass

        Handler.double = double
        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._http_thread.start()

    def kill(self) -> None:
        """The ServiceX app goes away (connections refused); the object store and running transformers stay."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def restart(self, *, forget: bool = False) -> None:
        """The app comes back on the same port; ``forget``: redeployed with its database lost (ids answer 404)."""
        if forget:
            with self._lock:
                self.transforms.clear()
        self._serve(self.port)

    def join_workers(self, timeout: float = 30) -> None:
        """Wait for every transform started so far (a slow one must not run on into the next test)."""
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    def stop(self) -> None:
        self.join_workers()
        self.kill()
        if self._s3_server is not None:
            self._s3_server.stop()

    def __enter__(self) -> ServiceXDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what tests look at ----------------------------------------------------------------------------------
    @property
    def submissions(self) -> list[dict[str, Any]]:
        """Every accepted transform request, in order (title, file-list, selection, result-format ...)."""
        return [t.request for t in self.transforms.values()]

    def files_submitted(self) -> list[str]:
        return [f for t in self.transforms.values() for f in t.files]

    def servicex_yaml(self, name: str = "double", token: str | None = None) -> str:
        """A ``servicex.yaml`` pointing at this double."""
        tok = self.refresh_token if token is None else token
        lines = ["api_endpoints:", f"  - name: {name}", f"    endpoint: {self.url}"]
        if tok:
            lines.append(f"    token: {tok}")
        return "\n".join(lines) + "\n"

    # ---- the transform worker --------------------------------------------------------------------------------
    def _submit(self, request: dict[str, Any]) -> Transform:
        unknown = False
        if request.get("file-list"):
            files = list(dict.fromkeys(request["file-list"]))  # the server counts a path once
        else:  # a dataset id: expanded here, as the server's DID finder would
            key = str(request.get("did") or "").split("://", 1)[-1].split("?", 1)[0]
            found = self.behaviour.datasets.get(key)
            files, unknown = list(found or []), found is None
        rid = str(uuid.uuid4())
        t = Transform(rid, request, files, did_id=len(self.transforms) + 1, unknown_dataset=unknown)
        if request.get("file-list"):
            t.status = "Running"  # a FileList request needs no lookup: Running, with files, at once
        with self._lock:
            self.transforms[rid] = t
        self.s3.create_bucket(Bucket=rid)
        th = threading.Thread(target=self._run, args=(t,), daemon=True)
        self._threads.append(th)
        th.start()
        return t

    def _run(self, t: Transform) -> None:
        b = self.behaviour
        time.sleep(b.delay)
        if t.title in b.bad_dataset or t.unknown_dataset:
            t.status, t.files = "Bad Dataset", []
            return
        t.status = "Running"
        stop_after = len(t.files) // 2 if t.title in (b.fatal | b.canceled) else None
        for i, path in enumerate(t.files):
            if stop_after is not None and i >= stop_after:
                t.status = "Fatal" if t.title in b.fatal else "Canceled"
                return
            if i:
                time.sleep(b.delay)
            if b.gate is not None and i == len(t.files) - 1:
                b.gate.wait(timeout=60)
            try:
                if path in b.failed_files:
                    raise RuntimeError("transformer failed on this file")
                tree = _tree_of(t.request.get("selection", ""))
                arr = self.executor(t.request["selection"], _local_path(path), tree)
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "out.parquet")
                    write_result(arr, out, b.writer)
                    with open(out, "rb") as f:
                        data = f.read()
                name = object_name(path)
                self.s3.put_object(Bucket=t.request_id, Key=name, Body=data)
            except Exception as err:
                with self._lock:
                    t.failed += 1
                    t.errors[path] = f"{type(err).__name__}: {err}"
                continue
            size = len(data) + (100 if t.title in b.short_download else 0)
            created = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat()
            with self._lock:
                t.results.append(
                    {"s3-object-name": name, "total-bytes": size, "transform_status": "success", "created_at": created}
                )
                t.completed += 1
        t.finish_time = dt.datetime.now(dt.timezone.utc).isoformat()
        t.status = "Complete"

    def file_errors(self) -> dict[str, str]:
        """Why each failed file of every transform failed (what a transformer pod's log would say)."""
        with self._lock:
            return {path: why for t in self.transforms.values() for path, why in t.errors.items()}

    def status_json(self, t: Transform) -> dict[str, Any]:
        r = t.request
        with self._lock:
            completed, failed = t.completed, t.failed
        return {
            "request_id": t.request_id,
            "did": r.get("did") or "filelist://",
            "did_id": t.did_id,
            "title": r.get("title"),
            "selection": r.get("selection", ""),
            "tree-name": None,
            "image": "sslhep/servicex_func_adl_uproot_transformer:double",
            "result-destination": r.get("result-destination", "object-store"),
            "result-format": r.get("result-format", "parquet"),
            "generated-code-cm": f"{t.request_id}-generated-source",
            "status": t.status,
            "app-version": "double",
            "files": len(t.files),
            "files-completed": completed,
            "files-failed": failed,
            "files-remaining": max(len(t.files) - completed - failed, 0),
            "failure-info": None,  # failed files never fill it in: the request still ends Complete
            "submit-time": t.submit_time,
            "finish-time": t.finish_time or "None",
            "minio-endpoint": self.s3_endpoint,
            "minio-secured": False,
            "minio-access-key": ACCESS_KEY,
            "minio-secret-key": SECRET_KEY,
        }


def _tree_of(qastle: str) -> str:
    """The tree name from ``(call EventDataset 'bogus.root' 'Events')``, as the transformer reads it."""
    marker = "(call EventDataset "
    i = qastle.find(marker)
    if i < 0:
        return "Events"
    parts = qastle[i + len(marker) :].split("'")
    return parts[3] if len(parts) > 3 else "Events"


class _Handler(BaseHTTPRequestHandler):
    double: ServiceXDouble

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        d = self.double
        if not d.refresh_token:
            return True
        header = self.headers.get("Authorization", "")
        return header.startswith("Bearer ") and header[len("Bearer ") :] in d.access_tokens

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    def do_GET(self) -> None:
        d = self.double
        url = urlparse(self.path)
        d.requests_log.append(("GET", url.path))
        parts = [p for p in url.path.split("/") if p]
        if parts == ["servicex"]:
            return self._send(
                200,
                {
                    "app-version": "double",
                    "code-gen-image": {"uproot": "sslhep/servicex_code_gen_func_adl_uproot:double"},
                    "capabilities": ["poll_local_transformation_results"],
                },
            )
        if not self._authorised():
            return self._send(401, {"message": "Not authorized"})
        if parts == ["servicex", "transformation"]:
            return self._send(200, {"requests": [d.status_json(t) for t in list(d.transforms.values())]})
        if len(parts) >= 3 and parts[:2] == ["servicex", "transformation"]:
            t = d.transforms.get(parts[2])
            if t is None:
                return self._send(404, {"message": f"Transformation request not found with id: {parts[2]}"})
            if len(parts) == 3:
                return self._send(200, d.status_json(t))
            if parts[3:] == ["results"]:
                q = parse_qs(url.query)
                later = q.get("later_than", [None])[0]
                with d._lock:
                    results = list(t.results)
                if later:
                    cut = dt.datetime.fromisoformat(later)
                    if cut.tzinfo is None:
                        cut = cut.replace(tzinfo=dt.timezone.utc)
                    results = [
                        r
                        for r in results
                        if dt.datetime.fromisoformat(r["created_at"]).replace(tzinfo=dt.timezone.utc) >= cut
                    ]
                return self._send(200, {"results": results})
        if len(parts) == 3 and parts[:2] == ["servicex", "datasets"]:
            now = dt.datetime.now(dt.timezone.utc).isoformat()
            return self._send(
                200,
                {
                    "id": int(parts[2]) if parts[2].isdigit() else 0,
                    "name": "double-dataset",
                    "did_finder": "rucio",
                    "n_files": 0,
                    "size": 0,
                    "events": 0,
                    "last_used": now,
                    "last_updated": now,
                    "lookup_status": "does_not_exist",
                    "is_stale": False,
                    "files": [],
                },
            )
        return self._send(404, {"message": f"no route {url.path}"})

    def do_POST(self) -> None:
        d = self.double
        url = urlparse(self.path)
        d.requests_log.append(("POST", url.path))
        if url.path == "/token/refresh":
            header = self.headers.get("Authorization", "")
            if d.behaviour.reject_refresh or header != f"Bearer {d.refresh_token}":
                return self._send(401, {"message": "refresh token rejected"})
            token = make_jwt(time.time() + 3600)
            d.access_tokens.add(token)
            return self._send(200, {"access_token": token})
        if url.path == "/servicex/transformation":
            if not self._authorised():
                return self._send(401, {"message": "Not authorized"})
            body = self._body()
            code = d.behaviour.submit_status.get(str(body.get("title")))
            if code:
                echo = f" (you sent {self.headers.get('Authorization')})" if d.behaviour.echo_auth else ""
                return self._send(code, {"message": f"double refused the request with {code}{echo}"})
            if body.get("result-format") not in ("parquet", "root-file", "root-rntuple"):
                return self._send(400, {"message": "bad result-format"})
            t = d._submit(body)
            return self._send(200, {"request_id": t.request_id})
        return self._send(404, {"message": f"no route {url.path}"})
