"""The delivery folder's record: round trip, status from what came back, verification, refusing bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agc_sx.manifest import MANIFEST_NAME, Manifest, ManifestError, OutputFile, SampleRecord
from agc_sx.utils import sha256_file


def _record(inputs: int = 2) -> SampleRecord:
    return SampleRecord("ttbar", "nominal", 396.87, "local",
                        [{"path": f"/data/f{i}.root", "nevts": 100 * (i + 1)} for i in range(inputs)])


def _output(base: Path, name: str, payload: bytes, input_path: str, nevts: int, rows: int) -> OutputFile:
    path = base / "ttbar__nominal" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return OutputFile(f"ttbar__nominal/{name}", input_path, nevts, rows, len(payload), sha256_file(path), "q" * 64)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    record = _record()
    record.set_output(_output(tmp_path, "f0.parquet", b"abc", "/data/f0.root", 100, 7))
    record.finish()
    manifest = Manifest(tmp_path, "query text", "q" * 64, {record.name: record}, extra={"stream": {"x": 1}})
    manifest.save()
    loaded = Manifest.load(tmp_path)
    assert loaded.query == "query text" and loaded.query_sha256 == "q" * 64
    assert loaded.extra == {"stream": {"x": 1}}
    again = loaded.samples["ttbar__nominal"]
    assert again == record
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert doc["samples"]["ttbar__nominal"]["nevts_total"] == 100
    assert doc["samples"]["ttbar__nominal"]["rows"] == 7


def test_a_sample_is_complete_only_when_every_input_came_back(tmp_path: Path) -> None:
    record = _record()
    record.set_output(_output(tmp_path, "f0.parquet", b"abc", "/data/f0.root", 100, 7))
    record.finish()
    assert record.status == "incomplete"
    assert [(f.path, f.error) for f in record.failed] == [("/data/f1.root", "not delivered")]
    assert record.nevts_total == 100  # only what was delivered normalises
    record.set_output(_output(tmp_path, "f1.parquet", b"defg", "/data/f1.root", 200, 9))
    record.finish()
    assert record.status == "complete" and not record.failed
    assert (record.nevts_total, record.rows) == (300, 16)


def test_a_failure_replaces_the_output_of_the_same_input(tmp_path: Path) -> None:
    record = _record(1)
    record.set_output(_output(tmp_path, "f0.parquet", b"abc", "/data/f0.root", 100, 7))
    record.set_failed("/data/f0.root", 100, "unreadable")
    assert not record.outputs and [f.error for f in record.failed] == ["unreadable"]


def test_verify_names_what_differs(tmp_path: Path) -> None:
    out = _output(tmp_path, "f0.parquet", b"abc", "/data/f0.root", 100, 7)
    assert out.verify(tmp_path) is None
    (tmp_path / out.file).write_bytes(b"abd")
    assert out.verify(tmp_path) == f"{out.file} checksum mismatch"
    (tmp_path / out.file).write_bytes(b"abcd")
    assert "4 bytes, the manifest says 3" in (out.verify(tmp_path) or "")
    (tmp_path / out.file).unlink()
    assert out.verify(tmp_path) == f"{out.file} is missing"
    escaping = OutputFile("../outside.parquet", "/x.root", 1, 1, 1, "0" * 64, "q" * 64)
    with pytest.raises(ManifestError, match="outside"):
        escaping.verify(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"samples": {"x": {"process": "ttbar"}}}', "[]"])
def test_a_damaged_manifest_is_one_error(tmp_path: Path, content: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match="not a valid agc-sx manifest"):
        Manifest.load(tmp_path)


def test_missing_folder_or_manifest_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is not a folder"):
        Manifest.load(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="agc-sx deliver"):
        Manifest.load(tmp_path)
    created = Manifest.open_or_create(tmp_path / "new")
    assert created.samples == {} and (tmp_path / "new").is_dir()
