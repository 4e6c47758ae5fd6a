"""``agc-sx run``: streaming equals deliver + process, resumes after a hard kill without double counting."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import uproot
from click.testing import CliRunner

from agc_sx.catalogue import load_catalog
from agc_sx.cli import main
from agc_sx.delivery.local import deliver_local
from agc_sx.generate import generate
from agc_sx.manifest import Manifest
from agc_sx.processor import run_processor
from agc_sx.streaming import CHECKPOINT_NAME, StreamError, run_streaming

SAMPLES = ["ttbar__nominal", "ttbar__ME_var", "ttbar__PS_var", "wjets__nominal", "single_top_tW__nominal"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five samples of two files each: enough files for a run to be interrupted half way."""
    out = tmp_path_factory.mktemp("stream_gen")
    generate(out, events_per_file=1500, files_per_sample=2, seed=5, samples=SAMPLES)
    return out / "ntuples.json"


@pytest.fixture(scope="module")
def reference(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deliver (local) followed by process: what streaming must reproduce."""
    base = tmp_path_factory.mktemp("stream_ref")
    report = deliver_local(load_catalog(generated), base / "delivered", quiet=True)
    assert report.ok
    run_processor(base / "delivered", output=base / "histograms.root", quiet=True)
    return base


def _contents(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with uproot.open(path) as f:
        return {k: (f[k].values(), f[k].variances()) for k in f.keys(cycle=False)}


def assert_same_histograms(a: Path, b: Path) -> None:
    for name in ("histograms.root", "histograms_ml.root"):
        ha, hb = _contents(a / name), _contents(b / name)
        assert ha.keys() == hb.keys()
        for key in ha:
            np.testing.assert_array_equal(ha[key][0], hb[key][0], err_msg=key)
            np.testing.assert_array_equal(ha[key][1], hb[key][1], err_msg=key)


def test_streaming_equals_deliver_then_process(generated: Path, reference: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "run", "--backend", "local", "--catalog", str(generated), "--output-dir", str(tmp_path / "delivered"),
        "--output", str(tmp_path / "histograms.root"), "--workers", "2", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "overlapped the delivery" in result.output
    assert_same_histograms(tmp_path, reference)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["pipeline"] == "streaming (local)"
    assert metrics["files_accumulated"] == metrics["files_processed_this_run"] == 10
    assert 0.0 <= metrics["overlap_fraction"] <= 1.0
    assert metrics["processing_seconds"] > 0 and metrics["delivery_wall_seconds"] > 0
    manifest = Manifest.load(tmp_path / "delivered")
    assert len(manifest.extra["stream"]["accumulated"]) == 10
    assert all(r.status == "complete" for r in manifest)


def test_killed_run_resumes_without_double_counting(generated: Path, reference: Path, tmp_path: Path) -> None:
    """A run SIGKILLed (with its whole process group) after three files is restarted and completes exactly."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from agc_sx.catalogue import load_catalog
        from agc_sx.streaming import run_streaming

        done = []
        def die_after_three(file):
            done.append(file)
            if len(done) == 3:
                os.killpg(os.getpgid(0), signal.SIGKILL)

        if __name__ == "__main__":
            run_streaming(load_catalog({str(generated)!r}), Path({str(tmp_path / "delivered")!r}),
                          backend="local", output=Path({str(tmp_path / "histograms.root")!r}), quiet=True,
                          on_accumulated=die_after_three)
    """)
    (tmp_path / "killed.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "killed.py")], start_new_session=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "histograms.root").exists()
    assert len(json.loads((tmp_path / "delivered" / CHECKPOINT_NAME).read_text())["accumulated"]) == 3

    result = run_streaming(load_catalog(generated), tmp_path / "delivered", backend="local",
                           output=tmp_path / "histograms.root", quiet=True)
    assert result.metrics["resumed_from_checkpoint"] is True
    assert result.metrics["files_processed_this_run"] == 7
    assert result.metrics["files_accumulated"] == 10
    assert_same_histograms(tmp_path, reference)

    # a third run finds everything accumulated and delivered: nothing is processed again, same result
    again = run_streaming(load_catalog(generated), tmp_path / "delivered", backend="local",
                          output=tmp_path / "histograms.root", quiet=True)
    assert again.metrics["files_processed_this_run"] == 0
    assert_same_histograms(tmp_path, reference)


def test_incomplete_delivery_writes_no_histograms(generated: Path, tmp_path: Path) -> None:
    catalog = json.loads(generated.read_text())
    broken = tmp_path / "broken.root"
    broken.write_bytes(b"not a ROOT file")
    catalog["wjets"]["nominal"]["files"][1]["path"] = str(broken)
    (tmp_path / "ntuples.json").write_text(json.dumps(catalog))
    with pytest.raises(StreamError, match=r"wjets__nominal: .*broken.root"):
        run_streaming(load_catalog(tmp_path / "ntuples.json"), tmp_path / "delivered", backend="local",
                      output=tmp_path / "histograms.root", quiet=True, ml=False)
    assert not (tmp_path / "histograms.root").exists()
    # what was processed is kept for the re-run
    assert len(json.loads((tmp_path / "delivered" / CHECKPOINT_NAME).read_text())["accumulated"]) == 9


def test_run_help_explains_the_options() -> None:
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for option in ("--backend", "--catalog", "--n-files", "--output", "--workers", "--no-ml", "--force"):
        assert option in result.output
    assert "checkpointed" in result.output


class _Trap:
    """Unpickling this creates a marker file: a checkpoint loader that unpickles would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_crafted_or_foreign_checkpoint_is_never_executed_nor_used(
    generated: Path, reference: Path, tmp_path: Path
) -> None:
    delivered = tmp_path / "delivered"
    delivered.mkdir()
    marker = tmp_path / "pwned"
    (delivered / ".agc-sx-stream.pkl").write_bytes(pickle.dumps(_Trap(marker)))  # the old name
    (delivered / CHECKPOINT_NAME).write_bytes(pickle.dumps(_Trap(marker)))  # and the current one
    args = ["run", "--backend", "local", "--catalog", str(generated), "--output-dir", str(delivered),
            "--output", str(tmp_path / "histograms.root")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert "checkpoint" in result.stderr and "starting afresh" in result.stderr
    assert_same_histograms(tmp_path, reference)

    # a well-formed checkpoint of another run (another catalogue) with inflated contents: ignored, one line
    doc = json.loads((delivered / CHECKPOINT_NAME).read_text())
    doc["key"] = "0" * 64
    for _key, h in doc["result"]["hists"]:
        h["sumw"] = [v * 1000 for v in h["sumw"]]
    (delivered / CHECKPOINT_NAME).write_text(json.dumps(doc))
    result = CliRunner().invoke(main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert_same_histograms(tmp_path, reference)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "starting afresh" not in result.stderr  # its own checkpoint: used
    # tampered contents of this run's own checkpoint are refused by validation, not trusted
    doc = json.loads((delivered / CHECKPOINT_NAME).read_text())
    doc["result"]["hists"][0][1]["sumw2"] = "not a list"
    (delivered / CHECKPOINT_NAME).write_text(json.dumps(doc))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "is not valid" in result.stderr
    assert_same_histograms(tmp_path, reference)
