"""The ServiceX backend through the *real* servicex client against the test double (tests/servicex_double.py).

Nothing of ours is patched: the client only has its polling intervals lowered (and its download retry wait
removed), the double runs the submitted qastle with the same func-adl-uproot path as the local backend, and
every run goes through ``agc-sx deliver`` as a user would.
"""

from __future__ import annotations

import gc
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from servicex_double import Behaviour, ServiceXDouble

from agc_sx.catalogue import Catalog, load_catalog
from agc_sx.cli import main
from agc_sx.delivery.databinder_config import funcadl_to_qastle
from agc_sx.delivery.servicex_backend import deliver_servicex, match_outputs
from agc_sx.manifest import Manifest, ManifestError
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

    before = set(threading.enumerate())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qc.Query, "__init__", fast_init)
        mp.setattr(MinioAdapter.download_file.retry, "wait", wait_none())
        with ServiceXDouble() as d:
            yield d
    servers = [t for t in threading.enumerate() if t not in before and "serve" in t.name]
    assert not servers, f"the double's servers still run: {servers}"


#: Threads that outlive a delivery by design: fsspec's global I/O loop, the servicex client's idle executor.
_RESIDENT = ("fsspecIO", "asyncio_")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Nothing a test starts (our watcher, the double's transforms, client threads) runs on into the next."""
    before = set(threading.enumerate())
    yield
    leaked = [
        t for t in threading.enumerate()
        if t not in before and not t.name.startswith(_RESIDENT) and "serve" not in t.name
    ]
    # the client's per-call executors end once collected, which a busy machine can delay: allow up to 10 s
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in leaked) and time.monotonic() < deadline:
        gc.collect()
        for t in leaked:
            t.join(timeout=0.2)
    leaked = [t.name for t in leaked if t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


@pytest.fixture(scope="module")
def local_out(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same catalogue delivered by the local backend (the reference for ServiceX results)."""
    out = tmp_path_factory.mktemp("local") / "out"
    catalog_json = Path(catalog.samples[0].files[0].path).parent / "ntuples.json"
    result = CliRunner().invoke(
        main, ["deliver", "--backend", "local", "--catalog", str(catalog_json), "--output-dir", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def sx(
    double: ServiceXDouble, catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SimpleNamespace]:
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
    yield SimpleNamespace(
        double=double, config=config, out=tmp_path / "out", catalog=catalog_json, tmp=tmp_path
    )
    double.join_workers()
    if double._http is None:  # a test killed it: the next test gets a running server again
        double.restart()
    assert not double._threads, "a transform of the double is still running"


def run(sx: SimpleNamespace, *args: str, quiet: bool = True) -> Any:
    argv = ["deliver", "--servicex-config", str(sx.config), *args]
    if "--config" not in args and "--catalog" not in args:
        argv += ["--catalog", str(sx.catalog)]
    if "--output-dir" not in args and "--config" not in args:
        argv += ["--output-dir", str(sx.out)]
    if quiet:
        argv.append("--quiet")
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def parquet_of(base: Path) -> dict[str, ak.Array]:
    return {str(p.relative_to(base)): ak.from_parquet(p) for p in sorted(base.glob("*/*.parquet"))}


def test_delivery_identical_to_local_and_rerun_reuses(sx: SimpleNamespace, catalog: Catalog, local_out: Path) -> None:
    result = run(sx)
    assert result.exit_code == 0, result.output
    subs = sx.double.submissions
    assert sorted(s["title"] for s in subs) == ["ttbar__nominal", "wjets__nominal"]
    assert {s["result-format"] for s in subs} == {"parquet"}
    assert {s["selection"] for s in subs} == {query_text()}
    for s in subs:
        assert s["file-list"] == [f.path for f in catalog[s["title"]].files]

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
        "Select(lambda e: {'a': open('pwned', 'w'), 'b': e.event})",  # a builtin the transformer would run
        "Select(lambda e: {'a': eval('1'), 'b': e.event})",
        "Select(lambda e: {'a': getattr(e, 'Jet_pt'), 'b': e.event})",
        "Select(lambda e: {'a': os.system('touch pwned'), 'b': e.event})",  # a free name
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


# ---- progressive storing ---------------------------------------------------------------------------------------
def _deliver_in_thread(
    sx: SimpleNamespace, catalog: Catalog, out: Path, release: Callable[[set[str]], bool], **kwargs: Any
) -> dict[str, Any]:
    """Run deliver_servicex in a thread and watch its manifest as ``agc-sx run`` does.

    The double holds the last file of every transform until ``release(files seen so far)`` is true (or 20 s
    passed), so "recorded before the server finished" does not depend on how busy the machine is. Returns the
    report and, per output file first seen in the saved manifest *before the delivery call returned*, whether
    the file on disk matched its record at that moment, and whether the gate had been released by then.
    """
    gate = threading.Event()
    sx.double.behaviour.gate = gate
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["report"] = deliver_servicex(catalog, out, servicex_config=sx.config, quiet=True, **kwargs)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="test-delivery")
    thread.start()
    early: dict[str, tuple[bool, str | None]] = {}
    deadline = time.monotonic() + 20
    try:
        while thread.is_alive():
            try:
                manifest = Manifest.load(out)
            except ManifestError:
                manifest = None
            running = thread.is_alive()  # read after the manifest: it was saved before the call returned
            if manifest is not None and running:
                for record in manifest:
                    for o in record.outputs:
                        if o.file not in early:
                            early[o.file] = (gate.is_set(), o.verify(out))
            if not gate.is_set() and (release(set(early)) or time.monotonic() > deadline):
                gate.set()
            time.sleep(0.05)
    finally:
        gate.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    outcome["early"] = early
    return outcome


def _one_of_each(names: Sequence[str]) -> Callable[[set[str]], bool]:
    return lambda seen: all(any(f.startswith(f"{n}/") for f in seen) for n in names)


def _records(base: Path) -> dict[str, Any]:
    """The manifest without timestamps: what two equivalent deliveries must agree on."""
    m = Manifest.load(base)
    return {
        r.name: (
            r.status,
            r.nevts_total,
            r.rows,
            sorted((o.file, o.input, o.nevts_input, o.rows, o.bytes, o.sha256, o.query_sha256) for o in r.outputs),
            sorted((f.path, f.error) for f in r.failed),
        )
        for r in m
    }


def test_outputs_recorded_while_the_client_still_runs(sx: SimpleNamespace, catalog: Catalog) -> None:
    outcome = _deliver_in_thread(sx, catalog, sx.out, _one_of_each(catalog.names))
    report = outcome["report"]
    assert report.ok and report.delivered == 4
    early = outcome["early"]
    for name in catalog.names:
        # recorded (verified, in place) while the server still held the sample's last file back
        seen = {f: v for f, v in early.items() if f.startswith(f"{name}/") and not v[0]}
        assert seen, f"no output of {name} was recorded while its transform was still running"
        assert all(problem is None for _, problem in seen.values())

    # the same delivery stored only at the end gives the same result, file for file
    sx.double.behaviour = Behaviour()
    plain = sx.tmp / "plain"
    report = deliver_servicex(catalog, plain, servicex_config=sx.config, quiet=True, progressive=False)
    assert report.ok and report.delivered == 4
    assert _records(sx.out) == _records(plain)
    assert parquet_of(sx.out).keys() == parquet_of(plain).keys()
    assert not any(t.name == "agc-sx-servicex-watcher" for t in threading.enumerate())


# ---- dataset ids: rucio and cernopendata -----------------------------------------------------------------------
def _dataset_catalog(sx: SimpleNamespace, catalog: Catalog, ids: dict[str, list[tuple[str, list[int]]]]) -> Path:
    """A catalogue whose file entries are dataset ids; each id expands (in the double) to some of the sample's files.

    ``ids``: sample -> [(dataset id, indices of the generated files it stands for)].
    """
    doc = json.loads(sx.catalog.read_text())
    for name, entries in ids.items():
        process, variation = name.split("__")
        files = catalog[name].files
        doc[process][variation]["files"] = [
            {"path": did, "nevts": sum(files[i].nevts for i in idx)} for did, idx in entries
        ]
        for did, idx in entries:
            sx.double.behaviour.datasets[did] = [files[i].path for i in idx]
    path = sx.tmp / "datasets.json"
    path.write_text(json.dumps(doc))
    return path


def test_rucio_dids_identical_to_local(sx: SimpleNamespace, catalog: Catalog, local_out: Path) -> None:
    ids = {
        "ttbar__nominal": [("user.agc:ttbar_nominal", [0, 1])],  # one DID expanding into two files
        "wjets__nominal": [("user.agc:wjets_a", [0]), ("user.agc:wjets_b", [1])],  # two DIDs in one sample
    }
    cat = _dataset_catalog(sx, catalog, ids)
    n_before = len(sx.double.submissions)
    result = run(sx, "--dataset-type", "rucio", "--catalog", str(cat))
    assert result.exit_code == 0, result.output
    subs = sx.double.submissions[n_before:]
    assert sorted((s["title"], s["did"]) for s in subs) == [
        ("ttbar__nominal", "rucio://user.agc:ttbar_nominal"),
        ("wjets__nominal--0", "rucio://user.agc:wjets_a"),
        ("wjets__nominal--1", "rucio://user.agc:wjets_b"),
    ]
    assert all(not s.get("file-list") for s in subs)

    m = Manifest.load(sx.out)
    reference = parquet_of(local_out)
    for name, entries in ids.items():
        rec = m.samples[name]
        assert rec.status == "complete" and rec.nevts_total == catalog[name].nevts_total
        assert len(rec.outputs) == 2
        for did, idx in entries:
            outs = sorted((o for o in rec.outputs if o.input == did), key=lambda o: o.file)
            assert len(outs) == len(idx)
            nevts = sum(catalog[name].files[i].nevts for i in idx)
            assert [o.nevts_input for o in outs] == [nevts] + [0] * (len(outs) - 1)  # counted once, on the first
        for o in rec.outputs:  # each output is the skim of one of the DID's files, identical to the local one
            assert o.verify(sx.out) is None
            twins = [k for k in reference if k.startswith(f"{name}/") and o.file.endswith(k.split("/")[1])]
            assert len(twins) == 1, (o.file, sorted(reference))
            assert ak.to_list(ak.from_parquet(sx.out / o.file)) == ak.to_list(reference[twins[0]])

    n_after, records = len(sx.double.submissions), _records(sx.out)
    again = run(sx, "--dataset-type", "rucio", "--catalog", str(cat))
    assert again.exit_code == 0, again.output
    assert len(sx.double.submissions) == n_after  # every DID reused, nothing asked again
    assert _records(sx.out) == records


def test_cernopendata_failed_file_drops_the_record_then_rerun(sx: SimpleNamespace, catalog: Catalog) -> None:
    ids = {"ttbar__nominal": [("12345", [0, 1])], "wjets__nominal": [("23456", [0, 1])]}
    cat = _dataset_catalog(sx, catalog, ids)
    sx.double.behaviour.failed_files = {catalog["ttbar__nominal"].files[1].path}
    # the bad file is held back until the good one has been stored
    outcome = _deliver_in_thread(sx, load_catalog(cat), sx.out, _one_of_each(["ttbar__nominal"]),
                                 dataset_type="cernopendata")
    report = outcome["report"]
    assert not report.ok
    assert report.failures == [
        "ttbar__nominal: 12345: 1 of 2 file(s) failed on ServiceX; the dataset counts only when complete "
        "(re-run to fetch it again)"
    ]
    # the good file had been stored while the transform ran; once the record proved incomplete it was taken back
    assert any(f.startswith("ttbar__nominal/") and not gate_open for f, (gate_open, _) in outcome["early"].items())
    m = Manifest.load(sx.out)
    ttbar, wjets = m.samples["ttbar__nominal"], m.samples["wjets__nominal"]
    assert ttbar.status == "incomplete" and ttbar.outputs == [] and ttbar.nevts_total == 0
    assert [f.path for f in ttbar.failed] == ["12345"]
    assert not list((sx.out / "ttbar__nominal").glob("*.parquet"))
    assert wjets.status == "complete" and wjets.nevts_total == catalog["wjets__nominal"].nevts_total

    sx.double.behaviour = Behaviour(datasets=sx.double.behaviour.datasets)
    n_before = len(sx.double.submissions)
    again = run(sx, "--dataset-type", "cernopendata", "--catalog", str(cat))
    assert again.exit_code == 0, again.output
    assert [(s["title"], s["did"]) for s in sx.double.submissions[n_before:]] == [
        ("ttbar__nominal", "cernopendata://12345")
    ]
    ttbar = Manifest.load(sx.out).samples["ttbar__nominal"]
    assert ttbar.status == "complete" and ttbar.nevts_total == catalog["ttbar__nominal"].nevts_total
    assert len(ttbar.outputs) == 2


@pytest.mark.parametrize(
    ("kind", "did", "expected"),
    [
        ("rucio", "ttbar_without_scope", "is not a Rucio DID (scope:name)"),
        ("rucio", "root://eos.example//store/x.root", "is not a Rucio DID (scope:name)"),
        ("cernopendata", "record-12", "is not a CERN Open Data record id"),
    ],
)
def test_malformed_dataset_id_refused_before_submission(
    sx: SimpleNamespace, catalog: Catalog, kind: str, did: str, expected: str
) -> None:
    cat = _dataset_catalog(sx, catalog, {"ttbar__nominal": [(did, [0])]})
    n = len(sx.double.submissions)
    result = run(sx, "--dataset-type", kind, "--catalog", str(cat), "--samples", "ttbar__nominal")
    assert result.exit_code == 1
    assert result.stderr.startswith("agc-sx: error: ttbar__nominal: ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(sx.double.submissions) == n


def test_a_file_still_being_written_is_seen_as_open(tmp_path: Path) -> None:
    """The watcher's guard: aioboto3 writes a download in place, so an open file is an unfinished one."""
    from agc_sx.delivery.servicex_backend.watcher import _open_here

    if _open_here() is None:
        pytest.skip("no /proc/self/fd here (the watcher then relies on size/mtime stability alone)")
    target = tmp_path / "download.parquet"
    with open(target, "wb") as f:
        f.write(b"PAR1")
        assert str(target.resolve()) in (_open_here() or set())
    assert str(target.resolve()) not in (_open_here() or set())


def test_streaming_run_through_servicex_equals_deliver_then_process(
    sx: SimpleNamespace, local_out: Path
) -> None:
    """``agc-sx run --backend servicex``: the files the client downloads are processed while it still runs."""
    from agc_sx.processor import run_processor

    reference = run_processor(local_out, output=sx.tmp / "reference" / "histograms.root", ml=False, quiet=True)
    result = CliRunner().invoke(main, [
        "run", "--backend", "servicex", "--servicex-config", str(sx.config), "--catalog", str(sx.catalog),
        "--output-dir", str(sx.out), "--output", str(sx.tmp / "histograms.root"), "--no-ml", "--quiet",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((sx.tmp / "metrics.json").read_text())
    assert metrics["pipeline"] == "streaming (servicex)" and metrics["files_accumulated"] == 4
    with uproot.open(sx.tmp / "histograms.root") as got:
        assert sorted(got.keys(cycle=False)) == sorted(reference.histograms)
        for key, h in reference.histograms.items():
            np.testing.assert_array_equal(got[key].values(), h.values(), err_msg=key)
            np.testing.assert_array_equal(got[key].variances(), h.variances(), err_msg=key)


# ---- what real servers hand back, and how they fail ------------------------------------------------------------
def _histograms(path: Path) -> dict[str, tuple[Any, Any]]:
    with uproot.open(path) as f:
        return {k: (f[k].values(flow=True), f[k].variances(flow=True)) for k in f.keys(cycle=False)}


def _process(delivery: Path, output: Path, *extra: str) -> dict[str, tuple[Any, Any]]:
    result = CliRunner().invoke(main, ["process", str(delivery), "--output", str(output), "--quiet", *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return _histograms(output)


def _assert_same(got: dict[str, tuple[Any, Any]], want: dict[str, tuple[Any, Any]]) -> None:
    assert sorted(got) == sorted(want)
    for key, (values, variances) in want.items():
        np.testing.assert_array_equal(got[key][0], values, err_msg=key)
        np.testing.assert_array_equal(got[key][1], variances, err_msg=key)


@pytest.mark.parametrize("writer", ["ak.to_parquet", "pyarrow"])
def test_every_parquet_producer_is_processed_like_local(
    sx: SimpleNamespace, local_out: Path, writer: str
) -> None:
    """The sidecar's ak.to_parquet conversion and a plain pyarrow writer (nullable, no awkward metadata)."""
    sx.double.behaviour.writer = writer
    assert run(sx).exit_code == 0
    _assert_same(_process(sx.out, sx.tmp / "h.root", "--no-ml"), _process(local_out, sx.tmp / "ref.root", "--no-ml"))


def test_real_transformer_output_gives_every_agc_histogram(
    sx: SimpleNamespace, generated_delivery: tuple[Path, Path]
) -> None:
    """deliver (ServiceX, parquet as the real uproot transformer writes it) -> process equals local, BDT on."""
    catalog_json, local = generated_delivery
    assert sx.double.behaviour.writer == "transformer"
    result = run(sx, "--catalog", str(catalog_json))
    assert result.exit_code == 0, result.output + f"\nthe double's transform errors: {sx.double.file_errors()}"
    some = next(sx.out.glob("ttbar__nominal/*.parquet"))
    import pyarrow.parquet as pq

    assert str(pq.read_schema(some).field("run").type) == "ak:uint32"  # awkward extension types, as the real one
    got = _process(sx.out, sx.tmp / "h.root")
    want = _process(local, sx.tmp / "ref.root")
    _assert_same(got, want)
    assert len(got) >= 100  # regions x processes x variations, and the BDT observables


def _client_script(tests: Path) -> str:
    """``agc-sx`` in a fresh interpreter with the client polling fast (as the in-process tests have it)."""
    return "\n".join([
        "import servicex.query_core as qc",
        "init = qc.Query.__init__",
        "def fast(self, *a, **k):",
        "    init(self, *a, **k)",
        "    self.servicex_polling_interval = self.minio_polling_interval = 0.05",
        "qc.Query.__init__ = fast",
        "from agc_sx.cli import main",
        "main()",
    ])


def test_ctrl_c_ends_within_two_seconds_and_resumes(sx: SimpleNamespace, catalog: Catalog) -> None:
    import signal
    import subprocess

    gate = threading.Event()  # every transform holds its last file: the delivery is mid-way
    sx.double.behaviour.gate = gate
    argv = [sys.executable, "-c", _client_script(Path(__file__).parent), "deliver", "--servicex-config",
            str(sx.config), "--catalog", str(sx.catalog), "--output-dir", str(sx.out), "--quiet"]
    out_file, err_file = sx.tmp / "stdout.txt", sx.tmp / "stderr.txt"
    with open(out_file, "w") as out_f, open(err_file, "w") as err_f:  # files: a full pipe never blocks it
        proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, text=True)
    try:
        if not _wait_for_outputs(sx.out, 2, timeout=120):
            proc.kill()
            pytest.fail(f"nothing was recorded while the transforms ran: {err_file.read_text()[-2000:]}")
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C while it winds down
        proc.wait(timeout=10)
        elapsed = time.monotonic() - start
        out, err = out_file.read_text(), err_file.read_text()
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
    assert elapsed < 2.0, f"took {elapsed:.1f} s to stop"
    assert proc.returncode == 130
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("agc-sx: error: interrupted: "), err
    assert "Traceback" not in out + err and "Task was destroyed" not in out + err
    m = Manifest.load(sx.out)
    kept = {o.file for r in m for o in r.outputs}
    assert len(kept) >= 2 and all(o.verify(sx.out) is None for r in m for o in r.outputs)
    assert {r.status for r in m} <= {"incomplete", "complete"}
    assert any("interrupted" in f.error for r in m for f in r.failed)
    sx.double.join_workers()
    result = run(sx)  # the next run completes the delivery, keeping what was recorded
    assert result.exit_code == 0, result.output
    m = Manifest.load(sx.out)
    assert all(r.status == "complete" for r in m) and kept <= {o.file for r in m for o in r.outputs}


def _wait_for_outputs(folder: Path, n: int, timeout: float) -> bool:
    """Wait until the manifest in ``folder`` records at least ``n`` outputs; False if it does not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(len(r.outputs) for r in Manifest.load(folder)) >= n:
                return True
        except ManifestError:
            pass
        time.sleep(0.05)
    return False


def _kill_mid_transform(sx: SimpleNamespace, catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> float:
    """Deliver while the server dies after the first files are recorded; the seconds until the report."""
    from agc_sx.delivery.servicex_backend import client

    monkeypatch.setattr(client, "HEARTBEAT_S", 0.2)
    gate = threading.Event()
    sx.double.behaviour.gate = gate
    outcome: dict[str, Any] = {}

    def target() -> None:
        outcome["result"] = run(sx)

    thread = threading.Thread(target=target)
    thread.start()
    _wait_for_outputs(sx.out, 2, timeout=60)
    sx.double.kill()
    killed = time.monotonic()
    thread.join(timeout=60)
    elapsed = time.monotonic() - killed
    gate.set()
    sx.double.join_workers()
    result = outcome["result"]
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lost the connection to ServiceX" in lines[0], result.stderr
    m = Manifest.load(sx.out)
    assert all(r.status == "incomplete" for r in m)
    assert sum(len(r.outputs) for r in m) >= 2 and all(r.failed for r in m)
    return elapsed


def test_server_dying_mid_transform_is_reported_then_resumed(
    sx: SimpleNamespace, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    elapsed = _kill_mid_transform(sx, catalog, monkeypatch)
    assert elapsed < 10  # the default heartbeat reports within 60 s (3 x 5 s + the client's own polls)
    n = len(sx.double.submissions)
    missing = {f.path for r in Manifest.load(sx.out) for f in r.failed}
    sx.double.restart()
    result = run(sx)
    assert result.exit_code == 0, result.output
    assert all(r.status == "complete" for r in Manifest.load(sx.out))
    asked = {f for s in sx.double.submissions[n:] for f in s["file-list"]}
    assert asked == missing  # only what the lost run had not recorded


def test_server_redeployed_without_its_state_is_asked_again(
    sx: SimpleNamespace, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's cache re-attaches to the request ids it submitted; a redeployed server answers 404."""
    from agc_sx.delivery.servicex_backend import client

    default_heartbeat = client.HEARTBEAT_S
    monkeypatch.setattr(client, "HEARTBEAT_S", 0.2)
    sx.double.behaviour.delay = 1.5  # nothing is transformed before the server goes away
    outcome: dict[str, Any] = {}
    before = len(sx.double.submissions)
    thread = threading.Thread(target=lambda: outcome.setdefault("result", run(sx)))
    thread.start()
    deadline = time.monotonic() + 30
    while len(sx.double.submissions) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    sx.double.kill()
    thread.join(timeout=60)
    sx.double.join_workers()
    assert outcome["result"].exit_code == 1 and "lost the connection" in outcome["result"].stderr
    assert not any(r.outputs for r in Manifest.load(sx.out))
    sx.double.behaviour.delay = 0.0
    sx.double.restart(forget=True)  # GET /servicex/transformation/<cached id> now answers 404
    assert not sx.double.submissions
    monkeypatch.setattr(client, "HEARTBEAT_S", default_heartbeat)  # a loaded machine must not look like a loss
    result = run(sx)
    assert result.exit_code == 0, result.output
    assert "not found" not in result.output
    assert all(r.status == "complete" for r in Manifest.load(sx.out))
    # the same requests again (the cache had them as submitted), answered by the redeployed server
    assert sorted(s["title"] for s in sx.double.submissions) == ["ttbar__nominal", "wjets__nominal"]
    assert sx.double.requests_log.count(("POST", "/servicex/transformation")) >= 4


def test_refused_token_marks_the_samples_with_the_reason(sx: SimpleNamespace) -> None:
    sx.double.behaviour.reject_refresh = True
    assert run(sx).exit_code == 1
    m = Manifest.load(sx.out)
    assert {r.status for r in m} == {"incomplete"}
    assert all(f.error.startswith("ServiceX endpoint double") and "refused the token" in f.error
               for r in m for f in r.failed)


def test_config_with_command_line_options(sx: SimpleNamespace, catalog: Catalog) -> None:
    query = "Select(lambda e: {'event': e.event, 'Jet_pt': e.Jet_pt})"
    yaml_path = _databinder_yaml(sx, catalog, query)
    result = run(sx, "--config", str(yaml_path), "--output-dir", str(sx.tmp / "mine"))
    assert result.exit_code == 0, result.output
    assert Manifest.load(sx.tmp / "mine").samples["ttbar__nominal"].status == "complete"  # the option won
    assert not (sx.tmp / "binder").exists()
    result = run(sx, "--config", str(yaml_path), "--endpoint", "nowhere")
    assert result.exit_code == 1 and "endpoint 'nowhere' is not in" in result.stderr
    result = run(sx, "--config", str(yaml_path), "--dataset-type", "rucio")
    assert result.exit_code == 1 and "--dataset-type" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
