"""A non-editable install must carry the query source, the catalogue and the models (``agc-sx`` from any folder)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agc_sx.manifest import ManifestError, contained, output_filename, safe_component, sample_dirname

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_queries_catalogue_and_models(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("agc_sx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "agc_sx/_data/ntuples.json" in names
    assert "agc_sx/_data/queries/skim.py" in names
    assert "agc_sx/_data/models/model_even.json" in names
    assert "agc_sx/_data/models/model_odd.json" in names
    assert "agc_sx/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "agc-sx = agc_sx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_names_cannot_escape_the_output_folder(tmp_path: Path) -> None:
    assert "/" not in sample_dirname("../../etc", "nominal")
    assert not sample_dirname("..", "..").startswith(".")
    assert safe_component("a/b\\c") == "a_b_c"
    assert output_filename("root://host//store/x/file_0001.root") == "file_0001.parquet"
    assert output_filename("https://h/x/../../y.root?auth=1") == "y.parquet"
    assert contained(tmp_path, sample_dirname("../x", "y")).parent == tmp_path.resolve()
    with pytest.raises(ManifestError, match="outside"):
        contained(tmp_path, "../evil.parquet")
