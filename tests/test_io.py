"""openrlhf_epo.demo.io: each write replaces the target whole, or leaves it as it was."""

import json
import math
import os
import stat

import pytest

from openrlhf_epo.demo.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_round_trips(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a.txt", "entropy \u2248 1.5\n")
    atomic_write_json(tmp_path / "a.json", {"b": [1, 2], "a": math.nan})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "entropy \u2248 1.5\n"
    loaded = json.loads((tmp_path / "a.json").read_text())
    assert loaded["b"] == [1, 2] and math.isnan(loaded["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.txt"]


def test_replaces_an_existing_file_and_respects_the_umask(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    old_umask = os.umask(0o022)
    try:
        atomic_write_text(path, "new")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"step": 1})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_missing_directory_is_an_error_not_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "no" / "such" / "file.txt", "x")
    assert not (tmp_path / "no").exists()
