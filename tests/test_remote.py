"""Reading at the facility: the three pipelines read ``root://`` and ``https://`` from a real XRootD server.

One XRootD daemon (tests/xrootd_server.py) serves generated NanoAOD over root:// and, through XrdHttp on the
same port with a self-signed certificate, over https://. Every pipeline must give exactly what it gives on
the local copies of the same files, report the bytes it read over the network, and fail in one line on a
missing file, a server that goes away, or an untrusted certificate. The https:// runs are separate
``agc-sx`` processes: trusting a certificate is decided by ``SSL_CERT_FILE`` when the process starts, as
for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from agc_sx.catalogue import Catalog, load_catalog, rewrite_prefix, save_catalog
from agc_sx.cli import main
from agc_sx.delivery import local as local_backend
from agc_sx.delivery.local import deliver_local
from agc_sx.manifest import Manifest
from agc_sx.processor import ProcessError, run_direct
from agc_sx.utils import sha256_file

SAMPLES = ["ttbar__nominal", "wjets__nominal"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The XRootD server (skips, saying why, where it cannot run)."""
    from xrootd_server import ServerUnavailable, XRootDServer

    try:
        srv = XRootDServer(tmp_path_factory.mktemp("xrootd"))
    except ServerUnavailable as err:
        pytest.skip(f"no XRootD server: {err}")
    try:
        srv.start()
    except ServerUnavailable as err:
        srv.close()
        pytest.skip(f"the XRootD server does not start here: {err}")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def data(server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Generated NanoAOD (2 samples x 2 files), local and on the server; catalogues for both and references."""
    from agc_sx.generate import generate

    base = tmp_path_factory.mktemp("facility")
    local = generate(base / "nanoaod", events_per_file=1500, files_per_sample=2, seed=23, samples=SAMPLES)
    for s in local:
        for f in s.files:
            server.add(Path(f.path), f"agc/{Path(f.path).name}")
    local_dir = str((base / "nanoaod").resolve())
    root_prefix = server.root_url("/store/agc")
    https_prefix = server.https_url("/store/agc")
    paths = {"local": base / "nanoaod" / "ntuples.json"}
    for name, prefix in (("root", root_prefix), ("https", https_prefix)):
        paths[name] = base / f"{name}.json"
        save_catalog(rewrite_prefix(local, local_dir, prefix), paths[name])
    reference = run_direct(local, output=base / "reference" / "histograms.root", ml=False, quiet=True,
                           executor="iterative", workers=1)
    delivered = base / "reference-delivery"
    assert deliver_local(local, delivered, workers=1, quiet=True).ok
    return {"base": base, "local": local, "catalogs": paths, "local_dir": local_dir, "root_prefix": root_prefix,
            "reference": reference, "delivered": delivered}


def _catalog(data: dict[str, Any], kind: str) -> Catalog:
    return load_catalog(data["catalogs"][kind])


def _shas(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.glob("*/*.parquet"))}


def _same_histograms(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b) and a
    for key in a:
        assert np.array_equal(a[key].values(flow=True), b[key].values(flow=True)), key
        assert np.array_equal(a[key].variances(flow=True), b[key].variances(flow=True)), key


def _histograms_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import uproot

    with uproot.open(path) as f:
        return {k.split(";")[0]: (h.values(flow=True), h.variances(flow=True)) for k, h in f.items()
                if hasattr(h, "values")}


def _same_files(a: Path, b: Path) -> None:
    ha, hb = _histograms_file(a), _histograms_file(b)
    assert set(ha) == set(hb) and ha
    for key in ha:
        assert np.array_equal(ha[key][0], hb[key][0]) and np.array_equal(ha[key][1], hb[key][1]), key


def _cli(args: list[str], *, trust: Path | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``agc-sx ARGS`` in a new process; ``trust``: the CA file to trust (SSL_CERT_FILE), None: the system's."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    if trust is not None:
        env["SSL_CERT_FILE"] = str(trust)
    env["AGC_SX_READ_BACKOFF"] = "0.2"
    command = [sys.executable, "-c", "from agc_sx.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


# --- identical results over root:// and https:// -----------------------------------------------------------


def test_local_delivery_over_root_equals_local_files(data: dict[str, Any], tmp_path: Path) -> None:
    report = deliver_local(_catalog(data, "root"), tmp_path / "out", workers=1, quiet=True)
    assert report.ok, report.failures
    assert _shas(tmp_path / "out") == _shas(data["delivered"])
    assert report.bytes_read > 0  # read over the network
    inputs = {o.input for r in Manifest.load(tmp_path / "out") for o in r.outputs}
    assert all(p.startswith("root://127.0.0.1:") for p in inputs)


def test_direct_processing_over_root_equals_local_files(data: dict[str, Any], tmp_path: Path) -> None:
    result = run_direct(_catalog(data, "root"), output=tmp_path / "histograms.root", ml=False, quiet=True,
                        executor="iterative", workers=1)
    _same_histograms(result.histograms, data["reference"].histograms)
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["bytes_read_network"] == metrics["bytes_read"] > 0
    assert data["reference"].metrics["bytes_read_network"] == 0


def test_streaming_run_over_root_with_prefix_options(data: dict[str, Any], tmp_path: Path) -> None:
    """``agc-sx run`` on the local catalogue, sent to the server by --prefix-from/--prefix-to (a redirector)."""
    out = tmp_path / "histograms.root"
    result = CliRunner().invoke(main, [
        "run", "--backend", "local", "--catalog", str(data["catalogs"]["local"]), "--no-ml", "--quiet",
        "--workers", "1", "--output-dir", str(tmp_path / "delivery"), "--output", str(out),
        "--prefix-from", data["local_dir"], "--prefix-to", data["root_prefix"],
    ])
    assert result.exit_code == 0, result.output
    _same_files(out, data["reference"].output)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["bytes_read_network"] > 0
    inputs = {o.input for r in Manifest.load(tmp_path / "delivery") for o in r.outputs}
    assert all(p.startswith(data["root_prefix"]) for p in inputs) and len(inputs) == 4


def test_prefix_options_on_deliver_and_process(data: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    prefix = ["--prefix-from", data["local_dir"], "--prefix-to", data["root_prefix"]]
    catalog = ["--catalog", str(data["catalogs"]["local"])]
    result = runner.invoke(main, ["deliver", "--backend", "local", *catalog, *prefix, "--workers", "1", "--quiet",
                                  "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert _shas(tmp_path / "out") == _shas(data["delivered"])
    result = runner.invoke(main, ["process", *catalog, *prefix, "--no-ml", "--quiet", "--executor", "iterative",
                                  "--workers", "1", "-o", str(tmp_path / "histograms.root")])
    assert result.exit_code == 0, result.output
    _same_files(tmp_path / "histograms.root", data["reference"].output)
    assert json.loads((tmp_path / "metrics.json").read_text())["bytes_read_network"] > 0
    # a prefix that matches nothing would silently read the original files: refused
    result = runner.invoke(main, ["process", *catalog, "--prefix-from", "/no/such/place", "--prefix-to",
                                  data["root_prefix"], "--quiet", "-o", str(tmp_path / "x.root")])
    assert result.exit_code == 1 and "matches none" in result.output
    result = runner.invoke(main, ["deliver", "--backend", "local", *catalog, "--prefix-from", "/x"])
    assert result.exit_code == 1 and "go together" in result.output


def test_https_pipelines_equal_local_files(data: dict[str, Any], server: Any, tmp_path: Path) -> None:
    """XrdHttp on the same port: deliver, process --catalog and run, each in its own agc-sx process."""
    https = str(data["catalogs"]["https"])
    done = _cli(["deliver", "--backend", "local", "--catalog", https, "--quiet", "--output-dir", "delivery"],
                trust=server.cert, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _shas(tmp_path / "delivery") == _shas(data["delivered"])
    (tmp_path / "direct").mkdir()
    done = _cli(["process", "--catalog", https, "--no-ml", "--quiet", "--workers", "1", "-o",
                 "direct/histograms.root"], trust=server.cert, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _same_files(tmp_path / "direct" / "histograms.root", data["reference"].output)
    metrics = json.loads((tmp_path / "direct" / "metrics.json").read_text())
    assert metrics["bytes_read_network"] > 0
    (tmp_path / "stream").mkdir()
    done = _cli(["run", "--backend", "local", "--catalog", https, "--no-ml", "--quiet", "--workers", "1",
                 "--output-dir", "stream/delivery", "--output", "stream/histograms.root"],
                trust=server.cert, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _same_files(tmp_path / "stream" / "histograms.root", data["reference"].output)


# --- faults ------------------------------------------------------------------------------------------------


def test_file_missing_on_the_server_is_one_line_and_the_rest_is_delivered(data: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    doc = json.loads(data["catalogs"]["root"].read_text())
    files = doc["ttbar"]["nominal"]["files"]
    missing = data["root_prefix"] + "/not_there.root"
    files.append({"path": missing, "nevts": 1500})
    catalog_path = tmp_path / "missing.json"
    catalog_path.write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["deliver", "--backend", "local", "--catalog", str(catalog_path),
                                       "--workers", "1", "--quiet", "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("agc-sx: failed:")]
    assert len(failed) == 1 and missing in failed[0] and "No such file on the server" in failed[0], result.output
    assert "Traceback" not in result.output
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.samples["ttbar__nominal"].status == "incomplete"
    assert len(manifest.samples["ttbar__nominal"].outputs) == 2
    assert manifest.samples["wjets__nominal"].status == "complete"
    result = CliRunner().invoke(main, ["process", "--catalog", str(catalog_path), "--quiet", "--no-ml",
                                       "--executor", "iterative", "--workers", "1", "-o", str(tmp_path / "h.root")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and missing in lines[0] and "No such file on the server" in lines[0], result.output


def test_server_restarting_mid_delivery_is_retried_and_completes(data: dict[str, Any], server: Any,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGC_SX_READ_BACKOFF", "0.4")  # tries at +0.4, +1.2, +2.8 s
    store = local_backend.store_output
    calls = []

    def store_then_restart_the_server(*args: Any, **kwargs: Any) -> Any:
        out = store(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the server goes away after the first file and is back a second later
            server.stop()
            threading.Timer(1.0, server.start).start()
        return out

    monkeypatch.setattr(local_backend, "store_output", store_then_restart_the_server)
    try:
        report = deliver_local(_catalog(data, "root"), tmp_path / "out", workers=1, quiet=True)
    finally:
        server.start()
    assert report.ok, report.failures
    assert _shas(tmp_path / "out") == _shas(data["delivered"])


def test_server_gone_is_retried_with_back_off_then_one_line_each(data: dict[str, Any], server: Any,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGC_SX_READ_ATTEMPTS", "3")
    monkeypatch.setenv("AGC_SX_READ_BACKOFF", "0.1")
    store = local_backend.store_output

    def store_then_kill_the_server(*args: Any, **kwargs: Any) -> Any:
        out = store(*args, **kwargs)
        server.stop()
        return out

    monkeypatch.setattr(local_backend, "store_output", store_then_kill_the_server)
    runner = CliRunner()
    args = ["deliver", "--backend", "local", "--catalog", str(data["catalogs"]["root"]), "--workers", "1",
            "--quiet", "--output-dir", str(tmp_path / "out")]
    try:
        result = runner.invoke(main, args)
        assert result.exit_code == 1
        failed = [line for line in result.output.splitlines() if line.startswith("agc-sx: failed:")]
        assert len(failed) == 3, result.output  # the first file landed, the three others could not be read
        assert all("unreachable, gave up after 3 attempts" in line for line in failed), failed
        assert "Traceback" not in result.output
        # direct processing against the dead server: one line, no traceback
        result = runner.invoke(main, ["process", "--catalog", str(data["catalogs"]["root"]), "--quiet", "--no-ml",
                                      "--executor", "iterative", "--workers", "1", "-o", str(tmp_path / "h.root")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "gave up after 3 attempts" in result.output and len(result.output.strip().splitlines()) == 1
    finally:
        server.start()
    monkeypatch.setattr(local_backend, "store_output", store)
    # the client waits out its stream error window (XRD_STREAMERRORWINDOW, 1 s) before it reconnects
    monkeypatch.setenv("AGC_SX_READ_BACKOFF", "0.5")
    result = runner.invoke(main, args)  # the server is back: only what is missing is delivered
    assert result.exit_code == 0, result.output
    assert "(3 new, 1 reused)" in result.output
    assert _shas(tmp_path / "out") == _shas(data["delivered"])


def test_untrusted_certificate_is_one_line_saying_how_to_trust_it(data: dict[str, Any], tmp_path: Path) -> None:
    https = str(data["catalogs"]["https"])
    done = _cli(["deliver", "--backend", "local", "--catalog", https, "--quiet", "--workers", "1",
                 "--samples", "wjets", "--n-files", "1", "--output-dir", "out"], trust=None, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("agc-sx: failed:")]
    assert len(failed) == 1 and "not trusted" in failed[0] and "SSL_CERT_FILE" in failed[0], done.stderr
    done = _cli(["process", "--catalog", https, "--quiet", "--no-ml", "--workers", "1", "--samples", "wjets",
                 "-o", "h.root"], trust=None, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SSL_CERT_FILE" in lines[0], done.stderr


def test_direct_processing_error_is_a_process_error(data: dict[str, Any], tmp_path: Path) -> None:
    """The library raises the one line too (not only the command line)."""
    moved = rewrite_prefix(_catalog(data, "root"), data["root_prefix"], data["root_prefix"] + "/nowhere")
    with pytest.raises(ProcessError, match="No such file on the server"):
        run_direct(moved.select(["wjets"], 1), output=tmp_path / "h.root", ml=False, quiet=True,
                   executor="iterative", workers=1)
