"""Every command answers a folder it cannot create, read or write with one line, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from agc_sx.cli import main


@pytest.fixture(scope="module")
def histograms(generated_delivery: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hists") / "histograms.root"
    result = CliRunner().invoke(main, ["process", str(generated_delivery[1]), "--output", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _one_line(result: object, needle: str) -> None:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agc-sx: error: ") and needle in lines[0], stderr
    assert "Traceback" not in result.output  # type: ignore[attr-defined]


def test_a_file_where_a_folder_should_be(
    generated_delivery: tuple[Path, Path], histograms: Path, tmp_path: Path
) -> None:
    catalog, delivery = generated_delivery
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    inside = blocker / "sub"
    cases = {
        "generate": ["generate", str(inside), "--events-per-file", "100", "--files-per-sample", "1",
                     "--no-progress"],
        "deliver": ["deliver", "--backend", "local", "--catalog", str(catalog), "--samples", "ttbar__nominal",
                    "--output-dir", str(inside), "--quiet"],
        "process": ["process", str(delivery), "--output", str(inside / "histograms.root"), "--no-ml", "--quiet"],
        "run": ["run", "--backend", "local", "--catalog", str(catalog), "--samples", "ttbar__nominal",
                "--output-dir", str(inside), "--no-ml", "--quiet"],
        "plot": ["plot", str(histograms), "--output-dir", str(inside)],
        "fit": ["fit", str(histograms), "--output-dir", str(inside), "--no-plots"],
        "demo": ["demo", "--workdir", str(inside), "--quiet"],
    }
    for name, argv in cases.items():
        _one_line(CliRunner().invoke(main, argv), "a-file")
        assert blocker.read_text() == "not a folder", name


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_a_folder_the_user_may_not_create(tmp_path: Path) -> None:
    """As an unprivileged user (root writes anywhere, so the test drops to ``nobody``)."""
    agc_sx = shutil.which("agc-sx")
    if agc_sx is None:
        pytest.skip("the agc-sx command is not on PATH")
    target = Path("/agc-sx-not-allowed-here")
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", agc_sx]
    probe = subprocess.run([*nobody, "--version"], capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"agc-sx cannot run as nobody here: {probe.stderr.strip()[-200:]}")
    proc = subprocess.run([*nobody, "generate", str(target), "--events-per-file", "100", "--no-progress"],
                          capture_output=True, text=True, timeout=120, cwd="/")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("agc-sx: error: ") and str(target) in lines[0] and "Permission denied" in lines[0]
    assert not target.exists()
