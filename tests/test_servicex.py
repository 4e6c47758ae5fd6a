"""The ServiceX backend through the *real* servicex client against the test double (tests/servicex_double.py).

Nothing of ours is patched: the client only has its polling intervals lowered (and its download retry wait
removed), the double runs the submitted qastle with the same func-adl-uproot path as the local backend, and
every run goes through ``agc-sx deliver`` as a user would.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import awkward as ak
import pytest
import uproot
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from servicex_double import Behaviour, ServiceXDouble

from agc_sx.catalogue import Catalog, load_catalog
from agc_sx.cli import main
from agc_sx.delivery.databinder_config import funcadl_to_qastle
from agc_sx.delivery.servicex_backend import match_outputs
from agc_sx.manifest import Manifest
from agc_sx.query import query_text

POLL_S = 0.05


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    """Two generated NanoAOD samples of two small files each (their catalogue is written beside them)."""
    from agc_sx.generate import generate

    out = tmp_path_factory.mktemp("inputs")
    return generate(out, events_per_file=300, files_per_sample=2, seed=7, samples=["ttbar__nominal", "wjets__nominal"])


@pytest.fixture(scope="module")
def double() -> Iterator[ServiceXDouble]:
    """One double for the module, with the client polling fast (its defaults are 5 s)."""
    import servicex.query_core as qc
    from servicex.minio_adapter import MinioAdapter
    from tenacity import wait_none

    original = qc.Query.__init__

    def fast_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.servicex_polling_interval = POLL_S
        self.minio_polling_interval = POLL_S

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qc.Query, "__init__", fast_init)
        mp.setattr(MinioAdapter.download_file.retry, "wait", wait_none())
        with ServiceXDouble() as d:
            yield d


@pytest.fixture
def sx(double: ServiceXDouble, catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fresh behaviour, a servicex.yaml in tmp_path, and HOME / caches / cwd away from the user's."""
    double.behaviour = Behaviour()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.delenv("BEARER_TOKEN_FILE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "servicex.yaml"
    config.write_text(double.servicex_yaml())
    catalog_json = Path(catalog.samples[0].files[0].path).parent / "ntuples.json"
    return SimpleNamespace(
        double=double, config=config, out=tmp_path / "out", catalog=catalog_json, tmp=tmp_path
    )


def run(sx: SimpleNamespace, *args: str, quiet: bool = True) -> Any:
    argv = ["deliver", "--servicex-config", str(sx.config), *args]
    if "--config" not in args:
        argv += ["--catalog", str(sx.catalog)]
    if "--output-dir" not in args and "--config" not in args:
        argv += ["--output-dir", str(sx.out)]
    if quiet:
        argv.append("--quiet")
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def parquet_of(base: Path) -> dict[str, ak.Array]:
    return {str(p.relative_to(base)): ak.from_parquet(p) for p in sorted(base.glob("*/*.parquet"))}


def test_delivery_identical_to_local_and_rerun_reuses(sx: SimpleNamespace, catalog: Catalog) -> None:
    result = run(sx)
    assert result.exit_code == 0, result.output
    subs = sx.double.submissions
    assert sorted(s["title"] for s in subs) == ["ttbar__nominal", "wjets__nominal"]
    assert {s["result-format"] for s in subs} == {"parquet"}
    assert {s["selection"] for s in subs} == {query_text()}
    for s in subs:
        assert s["file-list"] == [f.path for f in catalog[s["title"]].files]

    local_out = sx.tmp / "local"
    local = CliRunner().invoke(
        main, ["deliver", "--backend", "local", "--catalog", str(sx.catalog), "--output-dir", str(local_out), "--quiet"]
    )
    assert local.exit_code == 0, local.output
    remote, here = parquet_of(sx.out), parquet_of(local_out)
    assert sorted(remote) == sorted(here) and len(remote) == 4
    for name in remote:
        assert remote[name].fields == here[name].fields
        assert ak.to_list(remote[name]) == ak.to_list(here[name]), name
    m_remote, m_local = Manifest.load(sx.out), Manifest.load(local_out)
    for name in catalog.names:
        r, h = m_remote.samples[name], m_local.samples[name]
        assert (r.status, r.backend) == ("complete", "servicex")
        assert r.nevts_total == h.nevts_total == catalog[name].nevts_total
        assert r.rows == h.rows > 0
        assert all(o.verify(sx.out) is None for o in r.outputs)

    before = len(sx.double.submissions)
    again = run(sx)
    assert again.exit_code == 0, again.output
    assert len(sx.double.submissions) == before  # nothing asked again
    assert "0 new, 4 reused" in again.stdout


def test_failed_files_incomplete_then_rerun_fetches_only_missing(sx: SimpleNamespace, catalog: Catalog) -> None:
    bad = catalog["ttbar__nominal"].files[1]
    good = catalog["ttbar__nominal"].files[0]
    sx.double.behaviour.failed_files = {bad.path}
    result = run(sx)
    assert result.exit_code == 1
    assert f"ttbar__nominal: {bad.path}: the transform of this file failed on ServiceX" in result.stderr
    assert "Traceback" not in result.output
    m = Manifest.load(sx.out)
    ttbar, wjets = m.samples["ttbar__nominal"], m.samples["wjets__nominal"]
    assert ttbar.status == "incomplete" and [f.path for f in ttbar.failed] == [bad.path]
    assert ttbar.nevts_total == good.nevts  # only what was delivered normalises
    assert wjets.status == "complete"

    sx.double.behaviour = Behaviour()
    n_before = len(sx.double.submissions)
    again = run(sx)
    assert again.exit_code == 0, again.output
    new = sx.double.submissions[n_before:]
    assert [(s["title"], s["file-list"]) for s in new] == [("ttbar__nominal", [bad.path])]
    ttbar = Manifest.load(sx.out).samples["ttbar__nominal"]
    assert ttbar.status == "complete" and ttbar.nevts_total == catalog["ttbar__nominal"].nevts_total


@pytest.mark.parametrize(
    ("switch", "expected"),
    [
        ("fatal", "Fatal"),
        ("canceled", "Canceled|was canceled"),
        ("bad_dataset", "Bad Dataset|dataset problem"),
        ("short_download", "download interrupted or short"),
        ("submit500", "submission failed: ServiceX WebAPI Error during transformation submission: 500"),
        ("submit400", r"submission rejected \(HTTP 400\)"),
    ],
)
def test_sample_failure_is_one_line_and_others_delivered(
    sx: SimpleNamespace, catalog: Catalog, switch: str, expected: str
) -> None:
    b = sx.double.behaviour
    if switch.startswith("submit"):
        b.submit_status["ttbar__nominal"] = int(switch[len("submit") :])
    else:
        getattr(b, switch).add("ttbar__nominal")
    start = time.perf_counter()
    result = run(sx)
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("agc-sx: failed: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("agc-sx: failed: ttbar__nominal: ") and re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in result.output
    m = Manifest.load(sx.out)
    ttbar = m.samples["ttbar__nominal"]
    assert ttbar.status == "incomplete" and ttbar.outputs == [] and ttbar.nevts_total == 0
    assert sorted(f.path for f in ttbar.failed) == sorted(f.path for f in catalog["ttbar__nominal"].files)
    assert not list((sx.out / "ttbar__nominal").glob("*.parquet"))
    assert m.samples["wjets__nominal"].status == "complete"
    assert len(list((sx.out / "wjets__nominal").glob("*.parquet"))) == 2
    assert time.perf_counter() - start < 30


def test_refused_token_is_one_line(sx: SimpleNamespace) -> None:
    sx.double.behaviour.reject_refresh = True
    result = run(sx)
    assert result.exit_code == 1
    assert result.stderr.startswith("agc-sx: error: ServiceX endpoint double at ")
    assert "refused the token" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    m = Manifest.load(sx.out)
    assert all(not r.outputs for r in m)


def test_unreachable_server_fails_fast(sx: SimpleNamespace) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sx.config.write_text(f"api_endpoints:\n  - name: dead\n    endpoint: http://127.0.0.1:{port}\n    token: x\n")
    start = time.perf_counter()
    result = run(sx)
    assert result.exit_code == 1
    assert "ServiceX endpoint dead at http://127.0.0.1:" in result.stderr and "unreachable" in result.stderr
    assert time.perf_counter() - start < 10
    assert not sx.out.exists() or not list(sx.out.glob("*/*.parquet"))


def test_token_never_printed_logged_or_stored(
    sx: SimpleNamespace, catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    b = sx.double.behaviour
    b.echo_auth = True  # the server repeats our Authorization header in its error message
    b.submit_status["ttbar__nominal"] = 500
    b.failed_files = {catalog["wjets__nominal"].files[0].path}
    caplog.set_level("DEBUG")
    result = run(sx, quiet=False)
    assert result.exit_code == 1
    assert "you sent Bearer ***" in result.stderr  # the echoed token was there, and scrubbed
    secrets = [sx.double.refresh_token, *sx.double.access_tokens]
    assert len(secrets) >= 2
    texts = [result.output, caplog.text]
    texts += [p.read_bytes().decode("latin-1") for p in sx.out.rglob("*") if p.is_file()]
    for secret in secrets:
        assert secret
        assert all(secret not in t for t in texts)


def test_deleted_files_are_fetched_again(sx: SimpleNamespace) -> None:
    assert run(sx).exit_code == 0
    n = len(sx.double.submissions)
    victims = sorted((sx.out / "ttbar__nominal").glob("*.parquet"))
    for v in victims:
        v.unlink()
    # the same request again: served by the client's cache under the output folder, no new transform
    assert run(sx).exit_code == 0
    assert all(v.exists() for v in victims) and len(sx.double.submissions) == n
    # the client's cache does not notice deleted downloads; we do, and ask the server again
    cached_files = list((sx.out / ".servicex-cache").rglob("*.parquet"))
    assert len(cached_files) == 4  # the client's cache is ours, also with $TMPDIR elsewhere (tempfile patched)
    for cached in cached_files:
        cached.unlink()
    for v in victims:
        v.unlink()
    result = run(sx)
    assert result.exit_code == 0, result.output
    assert all(v.exists() for v in victims)
    assert [s["title"] for s in sx.double.submissions[n:]] == ["ttbar__nominal"]
    assert Manifest.load(sx.out).samples["ttbar__nominal"].status == "complete"


def _databinder_yaml(sx: SimpleNamespace, catalog: Catalog, funcadl: str) -> Path:
    files = [f.path for f in catalog["ttbar__nominal"].files]
    doc = {
        "General": {
            "ServiceXBackendName": "double",
            "OutputFormat": "parquet",
            "OutputDirectory": str(sx.tmp / "binder"),
            "IgnoreServiceXCache": True,
        },
        "Sample": [{"Name": "ttbar__nominal", "XRootDFiles": ", ".join(files), "Tree": "Events", "FuncADL": funcadl}],
    }
    path = sx.tmp / "binder.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def test_databinder_config_run(sx: SimpleNamespace, catalog: Catalog) -> None:
    query = "Where(lambda e: e.nJet >= 5)\n.Select(lambda e: {'event': e.event, 'Jet_pt': e.Jet_pt})"
    result = run(sx, "--config", str(_databinder_yaml(sx, catalog, query)))
    assert result.exit_code == 0, result.output
    out = sx.tmp / "binder"
    m = Manifest.load(out)
    rec = m.samples["ttbar__nominal"]
    assert rec.status == "complete" and rec.nevts_total == catalog["ttbar__nominal"].nevts_total
    for f in catalog["ttbar__nominal"].files:
        o = rec.output_for(f.path)
        assert o is not None
        got = ak.from_parquet(out / o.file)
        with uproot.open(f.path) as rf:
            ev = rf["Events"].arrays(["event", "nJet", "Jet_pt"])
        want = ev[ev.nJet >= 5]
        assert got.fields == ["event", "Jet_pt"]
        assert ak.to_list(got.event) == ak.to_list(want.event)
        assert ak.to_list(got.Jet_pt) == ak.to_list(want.Jet_pt)


@pytest.mark.parametrize(
    "funcadl",
    [
        "Select(lambda e: {'pt': e.Jet_pt",  # does not parse
        "__import__('os').system('touch pwned')",  # not a func_adl chain: refused, never evaluated
    ],
)
def test_bad_funcadl_rejected_before_submission(sx: SimpleNamespace, catalog: Catalog, funcadl: str) -> None:
    n = len(sx.double.submissions)
    result = run(sx, "--config", str(_databinder_yaml(sx, catalog, funcadl)))
    assert result.exit_code == 1
    assert result.stderr.startswith("agc-sx: error: ") and "sample ttbar__nominal: FuncADL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(sx.double.submissions) == n and not (sx.tmp / "pwned").exists()


def test_funcadl_forms_give_the_same_qastle() -> None:
    body = "Select(lambda e: {'a': e.Jet_pt, 'b': e.event})"
    q1 = funcadl_to_qastle(body, "Events")
    assert q1 == funcadl_to_qastle("FromTree('Events')." + body, "other")
    assert q1 == funcadl_to_qastle("EventDataset('bogus.root', 'Events')." + body)
    assert "'Events'" in q1 and "'T2'" in funcadl_to_qastle(body, "T2")
    with pytest.raises(ValueError, match="func_adl"):
        funcadl_to_qastle("Select(lambda e: [j for j in e.Jet_pt])")
    with pytest.raises(ValueError, match="exactly one argument"):
        funcadl_to_qastle("Where(lambda: True)")


def test_match_outputs_maps_every_naming_form() -> None:
    inputs = ["root://eos.example//store/a/x_1.root", "/data/b/x_2.root", "/data/c/unusual.root"]
    plain = ":data:b:x_2.root.parquet"
    import hashlib

    long_obj = inputs[0].replace("/", ":") + ".parquet"
    hashed = "_" + hashlib.sha1(long_obj.encode()).hexdigest() + long_obj[-19:]
    returned = [f"/cache/r/{hashed.replace(':', '_')}", f"/cache/r/{plain.replace(':', '_')}", "/cache/r/zzz.parquet"]
    found, unmatched = match_outputs(returned, inputs)
    assert found == {inputs[0]: returned[0], inputs[1]: returned[1]}
    assert unmatched == ["/cache/r/zzz.parquet"]


def test_catalogue_paths_are_what_the_double_reads(catalog: Catalog) -> None:
    """The generated catalogue on disk is the one the CLI reads (guards the fixture itself)."""
    on_disk = load_catalog(Path(catalog.samples[0].files[0].path).parent / "ntuples.json")
    assert on_disk.names == catalog.names and on_disk.nevts == catalog.nevts
