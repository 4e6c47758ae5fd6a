"""``agc-sx deliver --backend local`` on real ROOT files: content, layout, manifest, resume and failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
from click.testing import CliRunner

from agc_sx.catalogue import Catalog, InputFile, Sample, load_catalog, parse_catalog, save_catalog
from agc_sx.cli import main
from agc_sx.delivery import DeliveryError, deliver_local
from agc_sx.delivery.common import output_names
from agc_sx.manifest import Manifest
from agc_sx.query import OUTPUT_COLUMN_NAMES, OUTPUT_COLUMNS, column_types, query_text
from agc_sx.utils import sha256_file, sha256_text


def _catalog(entries: dict[str, list[Path]]) -> Catalog:
    """A catalogue from ``{"process__variation": [files]}`` with the files' true entry counts."""
    import uproot

    data: dict[str, dict[str, dict[str, object]]] = {}
    for name, files in entries.items():
        process, variation = name.split("__")
        rows = []
        for f in files:
            try:
                nevts = uproot.open(f)["Events"].num_entries
            except Exception:
                nevts = 7  # an unreadable input still has a catalogue entry
            rows.append({"path": str(f), "nevts": nevts})
        data.setdefault(process, {})[variation] = {"files": rows, "xsec": 1.0}
    return parse_catalog(data)


def _read(out_dir: Path, sample: str) -> ak.Array:
    files = sorted((out_dir / sample).glob("*.parquet"))
    return ak.concatenate([ak.from_parquet(f) for f in files])


def _shas(out_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(out_dir)): sha256_file(p) for p in sorted(out_dir.glob("*/*.parquet"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, nanoaod_writer) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("inputs")
    return {
        "ttbar__nominal": [nanoaod_writer(d / "tt" / f"tt_{i}.root", 400, 100 + i) for i in range(2)],
        "wjets__nominal": [nanoaod_writer(d / "wj" / "wj_0.root", 300, 200)],
        # nothing passes in this file (a file without events at all is refused by the catalogue: nevts 0)
        "ttbar__scaleup": [nanoaod_writer(d / "su" / "noleptons.root", 200, 300, leptons=False)],
    }


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory, inputs) -> tuple[Path, Catalog]:
    out = tmp_path_factory.mktemp("delivered") / "outputs_databinder"
    catalog = _catalog(inputs)
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok, report.failures
    assert report.delivered == catalog.n_files and report.reused == 0
    return out, catalog


def _fresh_copy(delivered: tuple[Path, Catalog], tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(delivered[0], out)
    return out


def test_delivered_events_and_columns_match_independent_skim(delivered, inputs, reference_skim) -> None:
    out, _ = delivered
    for name, files in inputs.items():
        got = _read(out, name)
        expected = ak.concatenate([reference_skim(f) for f in files])
        assert got.fields == list(OUTPUT_COLUMN_NAMES)
        assert np.array_equal(ak.to_numpy(got.event), ak.to_numpy(expected.event))
        assert ak.array_equal(got, expected), name
    assert sum(len(_read(out, n)) for n in ("ttbar__nominal", "wjets__nominal")) > 20


def test_manifest_records_inputs_outputs_and_normalisation(delivered) -> None:
    out, catalog = delivered
    manifest = Manifest.load(out)
    assert manifest.query == query_text() and manifest.query_sha256 == sha256_text(query_text())
    doc = json.loads((out / "manifest.json").read_text())
    for sample in catalog:
        record = manifest.samples[sample.name]
        assert record.status == "complete" and record.backend == "local" and not record.failed
        assert record.nevts_total == sum(f.nevts for f in sample.files) == doc["samples"][sample.name]["nevts_total"]
        assert record.xsec == sample.xsec
        assert sorted(o.input for o in record.outputs) == sorted(f.path for f in sample.files)
        for o in record.outputs:
            assert o.verify(out) is None
            assert o.rows == len(ak.from_parquet(out / o.file))
            assert o.file.startswith(sample.name + "/") and o.query_sha256 == manifest.query_sha256
    assert not list(out.rglob("*.part"))


def test_empty_outputs_are_valid_parquet_with_full_schema(delivered) -> None:
    out, _ = delivered
    for name in ("noleptons",):
        path = out / "ttbar__scaleup" / f"{name}.parquet"
        empty = ak.from_parquet(path)
        assert len(empty) == 0
        assert empty.fields == list(OUTPUT_COLUMN_NAMES)
        assert str(empty.type.content.fields) == str(list(OUTPUT_COLUMN_NAMES))
        assert "var * float32" in str(empty.Jet_pt.type)
    record = Manifest.load(out).samples["ttbar__scaleup"]
    assert record.rows == 0 and record.nevts_total == 200 and record.status == "complete"


def test_skim_is_a_superset_of_the_processor_selection(inputs, reference_skim) -> None:
    """Events the processor selects (nominal, pt_scale_up, b-tag variations) must all survive the skim."""
    import uproot

    c = np.float32
    scale_up_only = 0
    for files in inputs.values():
        for f in files:
            a = uproot.open(f)["Events"].arrays()
            skimmed = set(ak.to_numpy(reference_skim(f).event).tolist())
            ele = (a.Electron_pt > c(30)) & (abs(a.Electron_eta) < c(2.1)) & (a.Electron_cutBased == 4) & (
                a.Electron_sip3d < c(4))
            mu = (a.Muon_pt > c(30)) & (abs(a.Muon_eta) < c(2.1)) & a.Muon_tightId & (a.Muon_sip3d < c(4)) & (
                a.Muon_pfRelIso04_all < c(0.15))
            one_lepton = ak.sum(ele, axis=1) + ak.sum(mu, axis=1) == 1
            selected = {}
            for variation, pt in (("nominal", a.Jet_pt), ("pt_scale_up", a.Jet_pt * np.float64(1.03))):
                jets = (pt > 30) & (abs(a.Jet_eta) < c(2.4)) & ((a.Jet_jetId & 4) != 0)
                tagged = jets & (a.Jet_btagCSVV2 > c(0.5))
                keep = one_lepton & (ak.sum(jets, axis=1) >= 4) & (ak.sum(tagged, axis=1) >= 1)
                selected[variation] = set(ak.to_numpy(a.event[keep]).tolist())
                assert selected[variation] <= skimmed, (f, variation)
            # b-tag variations are weights on the nominal selection: covered by "nominal"
            scale_up_only += len(selected["pt_scale_up"] - selected["nominal"])
    assert scale_up_only > 0, "test data has no event that only the JES-up variation selects"


def test_delivered_parquet_opens_with_coffea_nanoaodschema(delivered) -> None:
    import warnings

    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    out, _ = delivered
    path = sorted((out / "ttbar__nominal").glob("*.parquet"))[0]
    raw = ak.from_parquet(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cross-references to collections the skim drops
        events = NanoEventsFactory.from_parquet(str(path), schemaclass=NanoAODSchema, mode="eager").events()
    assert len(events) == len(raw) > 0
    for collection, column in (("Jet", "pt"), ("Jet", "jetId"), ("Muon", "charge"), ("Electron", "cutBased")):
        assert ak.array_equal(events[collection][column], raw[f"{collection}_{column}"], check_parameters=False)
    assert ak.all(ak.num(events.Jet) == raw.nJet)
    assert ak.all(events.event == raw.event)


def test_rerun_skips_finished_files_and_force_redoes(delivered, tmp_path: Path) -> None:
    out = _fresh_copy(delivered, tmp_path)
    catalog = delivered[1]
    before = _shas(out)
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok and report.delivered == 0 and report.reused == catalog.n_files
    forced = deliver_local(catalog.select(["wjets"]), out, force=True, quiet=True)
    assert forced.ok and forced.delivered == 1 and forced.reused == 0
    assert _shas(out) == before  # deterministic: redone output is byte-identical
    assert set(Manifest.load(out).samples) == {s.name for s in catalog}  # other samples untouched


def test_resume_after_crash_redoes_missing_and_removes_partial_files(delivered, tmp_path: Path) -> None:
    out = _fresh_copy(delivered, tmp_path)
    catalog = delivered[1]
    before = _shas(out)
    # a run killed while writing tt_1: its output never got a final name or a manifest entry
    manifest = Manifest.load(out)
    record = manifest.samples["ttbar__nominal"]
    lost = next(o for o in record.outputs if o.file.endswith("tt_1.parquet"))
    record.outputs.remove(lost)
    record.status = "pending"
    manifest.save()
    (out / lost.file).unlink()
    partial = out / "ttbar__nominal" / ".tt_1.parquet.k1ll3d.part"
    partial.write_bytes(b"PAR1 half a file")
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok and report.delivered == 1 and report.reused == catalog.n_files - 1
    assert not partial.exists() and not list(out.rglob("*.part"))
    assert _shas(out) == before


def test_corrupt_or_foreign_outputs_are_redone(delivered, tmp_path: Path) -> None:
    out = _fresh_copy(delivered, tmp_path)
    catalog = delivered[1]
    before = _shas(out)
    victim = out / "wjets__nominal" / "wj_0.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(data))
    (out / "ttbar__nominal" / "tt_0.parquet").unlink()
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok and report.delivered == 2
    assert _shas(out) == before


def test_outputs_of_another_query_are_not_reused(delivered, tmp_path: Path) -> None:
    out = _fresh_copy(delivered, tmp_path)
    catalog = delivered[1]
    manifest = Manifest.load(out)
    manifest.samples["wjets__nominal"].outputs[0].query_sha256 = "0" * 64
    manifest.save()
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok and report.delivered == 1


def test_unreadable_input_is_reported_and_the_rest_delivered(delivered, inputs, tmp_path: Path, reference_skim) -> None:
    garbage = tmp_path / "in" / "garbage.root"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a ROOT file" * 10)
    missing = tmp_path / "in" / "missing.root"
    entries = {"ttbar__nominal": [inputs["ttbar__nominal"][0], garbage, missing], "wjets__nominal":
               inputs["wjets__nominal"]}
    catalog = _catalog(entries)
    out = tmp_path / "out"
    report = deliver_local(catalog, out, quiet=True)
    assert not report.ok
    assert len(report.failures) == 2
    assert all(line.count("\n") == 0 for line in report.failures)
    assert any(str(garbage) in line for line in report.failures)
    assert any(str(missing) in line and "No such file" in line for line in report.failures)
    manifest = Manifest.load(out)
    tt = manifest.samples["ttbar__nominal"]
    assert tt.status == "incomplete" and {f.path for f in tt.failed} == {str(garbage), str(missing)}
    assert tt.nevts_total == catalog["ttbar__nominal"].files[0].nevts  # only what was delivered
    assert manifest.samples["wjets__nominal"].status == "complete"
    assert ak.array_equal(_read(out, "ttbar__nominal"), reference_skim(inputs["ttbar__nominal"][0]))
    # once the input is readable, a re-run delivers only what is missing
    shutil.copyfile(inputs["ttbar__nominal"][1], garbage)
    missing.symlink_to(inputs["ttbar__nominal"][1])
    fixed = deliver_local(_catalog(entries), out, quiet=True)
    assert fixed.ok and fixed.delivered == 2 and fixed.reused == 2


def test_eager_skim_equals_the_dask_path_bit_for_bit_and_traces_once_per_layout(inputs, tmp_path: Path) -> None:
    """The local backend runs func-adl-uproot's code eagerly; the parquet must be what the dask path gives."""
    from agc_sx.delivery.common import write_parquet
    from agc_sx.delivery.local import Skim
    from agc_sx.query import execute

    text = query_text()
    skim = Skim(text)
    from conftest import REAL_NANOAOD

    real = [REAL_NANOAOD] if REAL_NANOAOD.exists() else []
    files = [f for fs in inputs.values() for f in fs]
    for i, f in enumerate([*files, *real]):
        eager, _ = skim(str(f))
        write_parquet(eager, tmp_path / f"eager{i}.parquet")
        write_parquet(execute(text, str(f)), tmp_path / f"dask{i}.parquet")
        assert (tmp_path / f"eager{i}.parquet").read_bytes() == (tmp_path / f"dask{i}.parquet").read_bytes(), f
    # the generated files share one branch layout, the real CMS file has its own (947 branches)
    assert len(skim.layouts) == 1 + len(real)
    assert all(set(columns) == set(OUTPUT_COLUMN_NAMES) for columns in skim.layouts.values())


def test_entries_differing_from_the_catalogue_are_named_and_the_sample_incomplete(inputs, tmp_path: Path) -> None:
    good, other = inputs["ttbar__nominal"]
    catalog = parse_catalog({"ttbar": {"nominal": {"xsec": 1.0, "files": [
        {"path": str(good), "nevts": 400}, {"path": str(other), "nevts": 450}]}}})
    report = deliver_local(catalog, tmp_path / "out", workers=1, quiet=True)
    assert not report.ok
    [line] = report.failures
    assert str(other) in line and "400 entries" in line and "catalogue says 450" in line
    record = Manifest.load(tmp_path / "out").samples["ttbar__nominal"]
    assert record.status == "incomplete" and [o.input for o in record.outputs] == [str(good)]
    assert record.nevts_total == 400  # only what was delivered counts


def test_truncated_and_non_root_files_get_a_reason_a_person_understands(inputs, tmp_path: Path) -> None:
    source = inputs["ttbar__nominal"][0]
    data = source.read_bytes()
    truncated = tmp_path / "in" / "truncated.root"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) // 2])
    small = tmp_path / "in" / "head_only.root"
    small.write_bytes(data[:5000])
    text = tmp_path / "in" / "notes.root"
    text.write_text("<html><body>404 Not Found</body></html>\n")
    html = tmp_path / "in" / "big.root"
    html.write_text("this is a text file named .root\n" * 1000)
    catalog = parse_catalog({"ttbar": {"nominal": {"xsec": 1.0, "files": [
        {"path": str(p), "nevts": 400} for p in (truncated, small, text, html)]}}})
    report = deliver_local(catalog, tmp_path / "out", workers=1, quiet=True)
    lines = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in report.failures}
    assert lines[str(truncated)] == (f"truncated ROOT file: {len(data) // 2:,} of {len(data):,} bytes "
                                     "(the size its header records); fetch it again")
    assert lines[str(small)].startswith("truncated ROOT file: 5,000 of ")
    assert lines[str(text)].startswith("not a ROOT file: it starts with '<html><body>404 Not Foun' (text")
    assert lines[str(html)].startswith("not a ROOT file: it starts with 'this is a text file name' (text")
    assert "Chunk" not in " ".join(report.failures)


def _ctrl_c_inputs(tmp_path: Path, nanoaod_writer) -> Path:
    """Twelve files in three samples, big enough that a Ctrl-C lands in the middle of the delivery."""
    entries = {name: [nanoaod_writer(tmp_path / "in" / name / f"f{i}.root", 40_000, 10 * k + i) for i in range(4)]
               for k, name in enumerate(("ttbar__nominal", "wjets__nominal", "ttbar__scaledown"))}
    path = tmp_path / "ntuples.json"
    save_catalog(_catalog(entries), path)
    return path


def test_ctrl_c_leaves_no_partial_files_and_the_next_run_resumes(tmp_path: Path, nanoaod_writer) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    catalog = _ctrl_c_inputs(tmp_path, nanoaod_writer)
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from agc_sx.cli import main; main()", "deliver", "--backend", "local",
               "--catalog", str(catalog), "--output-dir", str(out), "--workers", "2", "--quiet"]
    # a new session, and the signal to its whole process group: what Ctrl-C in a terminal does
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(r.outputs for r in Manifest.load(out)):
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the delivery ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines() == [line for line in stderr.strip().splitlines() if "interrupted" in line]
    assert not list(out.rglob("*.part")), sorted(out.rglob("*.part"))
    manifest = Manifest.load(out)
    kept = sum(len(r.outputs) for r in manifest)
    assert 1 <= kept < 12
    assert all(o.verify(out) is None for r in manifest for o in r.outputs)
    # the next run delivers only the rest, and the whole equals an uninterrupted delivery
    result = CliRunner().invoke(main, command[3:])
    assert result.exit_code == 0, result.output
    assert f"({12 - kept} new, {kept} reused)" in result.output
    clean = tmp_path / "clean"
    assert deliver_local(load_catalog(catalog), clean, workers=1, quiet=True).ok
    assert _shas(out) == _shas(clean)


@pytest.mark.parametrize("process,variation", [("../../escape", "nominal"), ("ttbar", "a/../../b"), ("..", "..")])
def test_sample_names_cannot_leave_the_output_folder(tmp_path: Path, inputs, process, variation) -> None:
    catalog = Catalog((Sample(process, variation, (InputFile(str(inputs["wjets__nominal"][0]), 300),), 1.0, 300),))
    out = tmp_path / "a" / "b" / "out"
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(out) for p in written)
    [parquet] = out.glob("*/*.parquet")
    assert parquet.parent.parent == out and ".." not in parquet.parent.name


def test_output_names_disambiguate_same_stem_inputs() -> None:
    names = output_names(["/a/x.root", "/b/x.root", "root://h//c/y.root"])
    assert len(set(names.values())) == 3 and names["root://h//c/y.root"] == "y.parquet"


def test_workers_give_identical_outputs(delivered, tmp_path: Path) -> None:
    catalog = delivered[1].select(["ttbar"])
    out = tmp_path / "out"
    report = deliver_local(catalog, out, workers=2, quiet=True)
    assert report.ok and report.delivered == catalog.n_files
    reference = {k: v for k, v in _shas(delivered[0]).items() if k.startswith("ttbar__")}
    assert _shas(out) == reference


def test_second_delivery_into_a_busy_folder_is_refused(tmp_path: Path, inputs) -> None:
    from agc_sx.delivery.common import open_delivery

    with open_delivery(tmp_path / "out", "q", "h"), pytest.raises(DeliveryError, match="another agc-sx"):
        deliver_local(_catalog({"wjets__nominal": inputs["wjets__nominal"]}), tmp_path / "out", quiet=True)


def test_generated_nanoaod_delivers_the_reference_events(tmp_path: Path, reference_skim) -> None:
    try:
        from agc_sx.generate import generate
    except Exception as err:  # the generator is developed alongside; its absence is not this module's failure
        pytest.skip(f"agc_sx.generate not usable: {err}")
    catalog = generate(tmp_path / "gen", events_per_file=300, files_per_sample=1, seed=5,
                       samples=["ttbar__nominal"])
    out = tmp_path / "out"
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok
    for sample in catalog:
        expected = ak.concatenate([reference_skim(f.path) for f in sample.files])
        assert len(expected) > 0
        assert ak.array_equal(_read(out, sample.name), expected)


def test_real_nanoaod_file(real_nanoaod: Path, tmp_path: Path, reference_skim) -> None:
    catalog = parse_catalog({"ttbar": {"nominal": {"files": [{"path": str(real_nanoaod), "nevts": 200}]}}})
    out = tmp_path / "out"
    report = deliver_local(catalog, out, quiet=True)
    assert report.ok
    got = _read(out, "ttbar__nominal")
    assert column_types(got) == dict(OUTPUT_COLUMNS)  # real CMS types, uint32 counters included
    assert ak.array_equal(got, reference_skim(real_nanoaod))
    assert Manifest.load(out).samples["ttbar__nominal"].nevts_total == 200


# --- the command line --------------------------------------------------------------------------------------


def test_cli_show_query_prints_the_qastle() -> None:
    result = CliRunner().invoke(main, ["deliver", "--show-query"])
    assert result.exit_code == 0
    assert result.output.strip() == query_text()


def test_cli_local_delivery_and_exit_codes(tmp_path: Path, inputs) -> None:
    good = tmp_path / "good.json"
    save_catalog(_catalog({"wjets__nominal": inputs["wjets__nominal"], "ttbar__nominal": inputs["ttbar__nominal"]}),
                 good)
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["deliver", "--backend", "local", "--catalog", str(good), "--output-dir", str(out), "--quiet"]
    result = runner.invoke(main, [*args, "--samples", "wjets", "--n-files", "1"])
    assert result.exit_code == 0, result.output
    assert "1 samples complete" in result.output
    assert set(Manifest.load(out).samples) == {"wjets__nominal"}

    bad = tmp_path / "bad.json"
    save_catalog(_catalog({"wjets__nominal": [tmp_path / "nope.root", *inputs["wjets__nominal"]]}), bad)
    result = runner.invoke(main, ["deliver", "--backend", "local", "--catalog", str(bad), "--output-dir",
                                  str(tmp_path / "out2"), "--quiet"])
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("agc-sx: failed:")]
    assert len(failed) == 1 and "nope.root" in failed[0]

    result = runner.invoke(main, [*args, "--samples", "wjets", "--n-files", "1", "--force"])
    assert result.exit_code == 0 and "(1 new, 0 reused)" in result.output

    result = runner.invoke(main, [*args, "--endpoint", "x"])
    assert result.exit_code != 0 and "--endpoint: only for --backend servicex" in result.output
    result = runner.invoke(main, [*args, "--samples", "nosuchprocess"])
    assert result.exit_code == 1 and "unknown sample" in result.output


def test_store_output_verifies_files_from_elsewhere(tmp_path: Path, delivered) -> None:
    """What the ServiceX backend hands over (files from the client's cache) is checked before it counts."""
    from agc_sx.delivery.common import open_delivery, plan, store_output

    good = ak.from_parquet(next((delivered[0] / "ttbar__nominal").glob("*.parquet")))
    sample = Sample("ttbar", "nominal", (InputFile("root://x//a/one.root", 10), InputFile("/b/two.root", 20)), 1.0, 30)
    text = query_text()
    sha = sha256_text(text)
    with open_delivery(tmp_path / "out", text, sha) as manifest:
        p = plan(manifest, sample, sha, backend="servicex")
        assert [f.path for f in p.todo] == [f.path for f in sample.files]
        bad = tmp_path / "bad.parquet"
        ak.to_parquet(good[[f for f in good.fields if f != "Muon_charge"]], bad)
        with pytest.raises(DeliveryError, match="Muon_charge"):
            store_output(manifest, p, sample.files[0], bad, query_sha256=sha)
        wrong_counter = ak.with_field(good, good.nJet + 1, "nJet")
        with pytest.raises(DeliveryError, match="nJet differs"):
            store_output(manifest, p, sample.files[0], wrong_counter, query_sha256=sha)
        (tmp_path / "trunc.parquet").write_bytes(bad.read_bytes()[:100])
        with pytest.raises(DeliveryError, match="unreadable parquet"):
            store_output(manifest, p, sample.files[0], tmp_path / "trunc.parquet", query_sha256=sha)
        assert not list((tmp_path / "out").rglob("*.parquet")) and not p.record.outputs
        # a zero-byte result (nothing passed, schema lost on the way) becomes a full-schema empty file
        (tmp_path / "nothing.parquet").write_bytes(b"")
        out = store_output(manifest, p, sample.files[1], tmp_path / "nothing.parquet", query_sha256=sha)
        assert out.rows == 0 and out.file == "ttbar__nominal/two.parquet"
        assert ak.from_parquet(tmp_path / "out" / out.file).fields == list(OUTPUT_COLUMN_NAMES)
        assert (tmp_path / "nothing.parquet").exists()  # copied, not moved
    saved = Manifest.load(tmp_path / "out").samples["ttbar__nominal"]
    assert saved.backend == "servicex" and [o.input for o in saved.outputs] == ["/b/two.root"]
