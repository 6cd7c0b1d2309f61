"""The one atomic-write helper: a crash inside the write leaves the old file whole and no temporary file behind."""

from __future__ import annotations

import pytest

from openowl.files import atomic_write, atomic_write_text, sha256


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "deep" / "state.json"
    atomic_write_text(target, "old\n")
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "weights.bin"
    atomic_write_text(target, "complete")

    def crash(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_sha256_of_a_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
