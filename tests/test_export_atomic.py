"""The one atomic file writer (`g2vlm_hf.export.atomic`): all or nothing, on disk before the rename, usual mode."""

from __future__ import annotations

import json
import os

import pytest

from g2vlm_hf.export import atomic
from g2vlm_hf.export.atomic import write_atomic, write_bytes_atomic, write_json_atomic, write_text_atomic


@pytest.fixture
def old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_bytes(b"old")
    return path


def test_serializer_raising_keeps_the_old_file_and_leaves_no_temporary(old_file):
    with pytest.raises(TypeError, match="set"):
        write_json_atomic(old_file, {"views": {1, 2}})  # JSON has no sets
    assert os.listdir(old_file.parent) == [old_file.name]
    assert old_file.read_bytes() == b"old"


def test_failure_after_part_of_the_content_keeps_the_old_file(old_file):
    def write_half(handle):
        handle.write(b"new and half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(old_file, write_half)
    assert os.listdir(old_file.parent) == [old_file.name]
    assert old_file.read_bytes() == b"old"


def test_failing_rename_keeps_the_old_file_and_leaves_no_temporary(old_file, monkeypatch):
    def failing_replace(source, destination):
        raise OSError("rename refused")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename refused"):
        write_text_atomic(old_file, "new")
    assert os.listdir(old_file.parent) == [old_file.name]
    assert old_file.read_bytes() == b"old"


def test_content_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.fstat(descriptor).st_size))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", os.path.getsize(source)))
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_bytes_atomic(tmp_path / "a.bin", b"12345")
    assert events == [("fsync", 5), ("replace", 5)]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_file_has_the_mode_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = write_bytes_atomic(tmp_path / "sub" / "a.bin", b"x")  # the folder is created on the way
    finally:
        os.umask(previous)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert path.read_bytes() == b"x"


def test_json_is_indented_keeps_non_ascii_and_ends_in_a_newline(tmp_path):
    document = {"question": "Wie weit ist die Tür?", "answer": 2.5}
    path = write_json_atomic(tmp_path / "answer.json", document)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == document
    assert "Tür" in text and text.endswith("}\n") and '\n  "answer": 2.5' in text
