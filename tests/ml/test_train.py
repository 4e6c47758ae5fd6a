"""``agc-sx train`` writes to a folder of its own and never replaces models without --force."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from agc_sx.cli import main
from agc_sx.resources import default_models_dir


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ttbar_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agc_sx.generate import generate

    base = tmp_path_factory.mktemp("train")
    generate(base / "nano", events_per_file=3000, files_per_sample=1, seed=5, samples=["ttbar__nominal"])
    return base / "nano" / "ntuples.json"


def test_default_output_is_a_new_folder_not_the_bundled_models(ttbar_catalog: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where a checkout's ``models/`` is (as the repository root): it stays as it was."""
    bundled = _digest(default_models_dir())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_even.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["train", "--catalog", str(ttbar_catalog), "--rounds", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "trained_models"
    assert (out / "model_even.json").is_file() and (out / "model_odd.json").is_file()
    assert (tmp_path / "models" / "model_even.json").read_text() == "{}"
    assert _digest(default_models_dir()) == bundled

    again = CliRunner().invoke(main, ["train", "--catalog", str(ttbar_catalog), "--rounds", "2"])
    assert again.exit_code == 1 and "already holds" in again.output and "--force" in again.output
    assert len(again.output.strip().splitlines()) == 1


def test_the_default_is_not_models() -> None:
    from agc_sx.cli.train import DEFAULT_OUTPUT

    assert DEFAULT_OUTPUT.name != "models"
    assert "trained_models" in CliRunner().invoke(main, ["train", "--help"]).output


def test_bundled_models_are_refused_without_force(tmp_path: Path) -> None:
    bundled = _digest(default_models_dir())
    res = CliRunner().invoke(main, ["train", "--catalog", str(tmp_path / "none.json"),
                                    "-o", str(default_models_dir())])
    assert res.exit_code == 1
    assert "bundled models" in res.output and "--force" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert _digest(default_models_dir()) == bundled
