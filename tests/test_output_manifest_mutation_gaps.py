"""What a mutation-testing pass of the output layer's record and last step (`output_manifest`, `rename_noreplace`)
found unpinned: behaviour a user relies on that a changed line of those modules kept passing every earlier test (the
manifest's on-disk record and the command it names, what is not a manifest of ours, damaged entries, paths listed
outside the folder, the folders an old output is emptied of, relative renames and the fallback rename). Each test
names the wrong behaviour it catches; all work on real files and folders in tmp_path.

`rename_noreplace` is one system call on Linux; where that call is missing (another libc, a file system without
`RENAME_NOREPLACE`, macOS) a fallback does the same with `mkdir` and `rename`. Those systems are stood in for by a
C library that lacks the call or answers it with the error such a system gives; the folders moved are real."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from test_ownership import make_output  # an earlier output, written through the real transaction

import g2vlm_hf.rename_noreplace as noreplace_module
from g2vlm_hf.output_manifest import COMMAND_SHOWN_CHARS, MANIFEST_NAME, seal
from g2vlm_hf.rename_noreplace import rename_noreplace
from g2vlm_hf.safe_output import OutputError, check_output_dir, clean_leftovers, output_lock, staged_outputs


def _record(folder: Path, files: dict[str, dict | None], kind: str = "reconstruction") -> None:
    """A manifest of this package's own form in `folder`, listing `files` with the entries given."""
    manifest = {"tool": "g2vlm-hf", "format": 1, "state": "complete", "kind": kind, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")


def _entry(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ------------------------------------------------------------------------------------------------ rename_noreplace


def test_rename_noreplace_takes_paths_relative_to_the_current_folder(tmp_path, monkeypatch):
    """Relative paths are relative to the current folder (`AT_FDCWD`), as for `os.rename`: another directory
    descriptor makes every relative rename fail."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "a.txt").write_text("new")
    (tmp_path / "theirs").mkdir()
    rename_noreplace("staged", "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "new" and names(tmp_path) == ["out", "theirs"]
    with pytest.raises(FileExistsError):
        rename_noreplace("out", "theirs")
    assert names(tmp_path) == ["out", "theirs"] and names(tmp_path / "theirs") == []


class _Renameat2:
    """A C `renameat2` that fails with `code`, as on a system or file system without `RENAME_NOREPLACE`."""

    def __init__(self, code: int):
        self.code = code
        self.argtypes = None

    def __call__(self, *args: object) -> int:
        ctypes.set_errno(self.code)
        return -1


class _Libc:
    """A C library with the given `renameat2`, or without one (None)."""

    def __init__(self, renameat2: _Renameat2 | None):
        if renameat2 is not None:
            self.renameat2 = renameat2


def _no_libc(*args: object, **kwargs: object) -> object:
    raise OSError("no C library here")


SYSTEMS = {
    "no-loadable-libc": _no_libc,
    "libc-without-renameat2": lambda *args, **kwargs: _Libc(None),
    "renameat2-ENOSYS": lambda *args, **kwargs: _Libc(_Renameat2(errno.ENOSYS)),
    "renameat2-EINVAL": lambda *args, **kwargs: _Libc(_Renameat2(errno.EINVAL)),
    "renameat2-ENOTSUP": lambda *args, **kwargs: _Libc(_Renameat2(errno.ENOTSUP)),
}


@pytest.fixture(params=sorted(SYSTEMS))
def without_renameat2(request, monkeypatch) -> str:
    """A system where `renameat2(..., RENAME_NOREPLACE)` cannot be used, for the duration of the test."""
    monkeypatch.setattr(noreplace_module.ctypes, "CDLL", SYSTEMS[request.param])
    return request.param


def test_without_renameat2_a_folder_is_moved_to_a_free_name(tmp_path, without_renameat2):
    """The fallback moves the folder with its content; it must neither claim a move it did not make (the swap would
    then remove the new output with its staging folder) nor fail with the error of the missing call."""
    source = tmp_path / "staged"
    (source / "depth").mkdir(parents=True)
    (source / "depth" / "d.png").write_bytes(b"png")
    rename_noreplace(source, tmp_path / "out")
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "depth" / "d.png").read_bytes() == b"png"


@pytest.mark.parametrize("there", ["empty folder", "folder", "file"])
def test_without_renameat2_nothing_at_the_target_is_replaced(tmp_path, without_renameat2, there):
    """Not even an empty folder is replaced (plain `rename` would replace it), and the source stays where it was."""
    source, target = tmp_path / "staged", tmp_path / "out"
    source.mkdir()
    (source / "a.txt").write_text("new")
    if there == "file":
        target.write_text("theirs")
    else:
        target.mkdir()
        if there == "folder":
            (target / "b.txt").write_text("theirs")
    with pytest.raises(FileExistsError):
        rename_noreplace(source, target)
    assert (source / "a.txt").read_text() == "new" and names(tmp_path) == ["out", "staged"]
    if there == "file":
        assert target.read_text() == "theirs"
    else:
        assert names(target) == ([] if there == "empty folder" else ["b.txt"])


def test_without_renameat2_a_failed_move_leaves_no_folder_at_the_target(tmp_path, without_renameat2):
    """The name reserved for the move is given up when the move fails, and the failure is raised."""
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "gone", tmp_path / "out")
    assert names(tmp_path) == []


# ------------------------------------------------------------------------------------------------ the manifest


def test_the_manifest_on_disk_is_the_documented_record(tmp_path, monkeypatch):
    """The record other runs (of this or a later version) and other tools read: the tool, the format, the state,
    the kind, the command, when, and every file with its size and sha256; the manifest itself is not listed."""
    monkeypatch.setattr(sys, "argv", ["g2vlm", "reconstruct", "photos", "--output", "out"])
    output = make_output(tmp_path / "out", {"cameras.json": b"{}", "depth/d.png": b"png"})
    manifest = json.loads((output / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert {key: manifest[key] for key in ("tool", "format", "state", "kind", "command")} == {
        "tool": "g2vlm-hf",
        "format": 1,
        "state": "complete",
        "kind": "reconstruction",
        "command": "g2vlm reconstruct photos --output out",
    }
    assert manifest["files"] == {
        name: _entry(data) for name, data in {"cameras.json": b"{}", "depth/d.png": b"png"}.items()
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*", manifest["written"]), manifest["written"]


def test_an_output_recorded_by_hand_in_the_documented_format_is_replaced(tmp_path):
    """An earlier output whose manifest holds just the documented record (as an earlier version wrote it) is
    recognised: --overwrite replaces it and leaves nothing of it behind, its nested folders included."""
    output = tmp_path / "out"
    (output / "depth").mkdir(parents=True)
    files = {"cameras.json": b"{}", "depth/d.png": b"png", "depth/deeper/e.png": b"png"}
    for name, data in files.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(data)
    _record(output, {name: _entry(data) for name, data in files.items()})
    with staged_outputs([output], kinds=["reconstruction"], overwrite=True) as (staging,):
        (staging / "new.txt").write_text("new")
    assert names(output) == [MANIFEST_NAME, "new.txt"] and names(tmp_path) == ["out"]


def test_the_staging_manifest_names_its_writer_and_target(tmp_path):
    """While a run writes, its staging folder holds a manifest without files naming the output it stages and its
    writer (what the next run reads to tell a killed run's leftover from a folder still being written)."""
    with staged_outputs([tmp_path / "out"], kinds=["reconstruction"]) as (staging,):
        manifest = json.loads((staging / MANIFEST_NAME).read_text(encoding="utf-8"))
        (staging / "a.txt").write_text("a")
    assert {key: manifest[key] for key in ("tool", "format", "state", "target", "files")} == {
        "tool": "g2vlm-hf",
        "format": 1,
        "state": "staging",
        "target": "out",
        "files": {},
    }
    assert manifest["writer"]["pid"] == os.getpid() and manifest["writer"]["host"]


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/home/me/make_scene.py"], "make_scene.py"),  # a script without arguments
        ([""], "python"),  # the interactive interpreter
        ([], "python"),  # an embedded one
        (["g2vlm", "--token", "hf_secret", "--token=hf_other", "x"], "g2vlm --token *** --token=*** x"),
    ],
)
def test_the_recorded_command_is_the_programs_name_and_arguments(tmp_path, monkeypatch, argv, command):
    """The command a manifest records (and the refusal of another kind names), whatever `sys.argv` holds."""
    monkeypatch.setattr(sys, "argv", argv)
    output = make_output(tmp_path / "out", {"a.txt": b"a"})
    with pytest.raises(OutputError) as refusal:
        check_output_dir(output, kind="colmap", overwrite=True)
    assert f"previous reconstruction output (`{command}`), not a colmap one" in str(refusal.value)


@pytest.mark.parametrize("extra", [0, 1, 40])
def test_a_long_command_is_recorded_shortened_to_its_limit(tmp_path, monkeypatch, extra):
    """A command up to `COMMAND_SHOWN_CHARS` is recorded whole; a longer one is cut to exactly that many characters,
    ending in `...`."""
    words = ["g2vlm", "reconstruct", "p" * (COMMAND_SHOWN_CHARS - len("g2vlm reconstruct ") + extra)]
    monkeypatch.setattr(sys, "argv", words)
    output = make_output(tmp_path / "out", {"a.txt": b"a"})
    command = json.loads((output / MANIFEST_NAME).read_text(encoding="utf-8"))["command"]
    whole = " ".join(words)
    if extra == 0:
        assert command == whole
    else:
        assert len(command) == COMMAND_SHOWN_CHARS and command == whole[: COMMAND_SHOWN_CHARS - 3] + "..."


def test_a_refused_writer_is_told_when_the_holder_started(tmp_path):
    """The lock record names when its writer started, a date and time the user can read."""
    with output_lock(tmp_path / "out"), pytest.raises(OutputError) as refusal, output_lock(tmp_path / "out"):
        pass
    assert re.search(r", started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", str(refusal.value)), str(refusal.value)


def test_an_unknown_kind_is_refused_before_anything_is_swapped(tmp_path):
    """A kind outside `KINDS` (a typo of a library caller) is an error naming it; the target is not written and the
    staging folder goes."""
    with (
        pytest.raises(ValueError, match=r"Unknown output kind 'recon'"),
        staged_outputs([tmp_path / "out"], kinds=["recon"]) as (staging,),
    ):
        (staging / "a.txt").write_text("a")
    assert names(tmp_path) == []


NOT_OURS = {
    "another tool's": lambda record: {"tool": "other-tool", "state": "complete", "kind": "reconstruction", **record},
    "a list": lambda record: [record],
    "files not a mapping": lambda record: {
        "tool": "g2vlm-hf",
        "state": "complete",
        "kind": "reconstruction",
        "files": list(record["files"]),
    },
    "no files": lambda record: {"tool": "g2vlm-hf", "state": "complete", "kind": "reconstruction"},
}


@pytest.mark.parametrize("content", sorted(NOT_OURS))
def test_a_manifest_this_package_did_not_write_makes_the_folder_a_users(tmp_path, content):
    """A `.g2vlm-output` of another tool, or not the record this package writes, does not make the folder ours:
    --overwrite is refused with the usual reason, not a crash, and the user's file (listed there with its very
    size and sha256) stays."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"theirs")
    record = {"files": {"data.bin": _entry(b"theirs")}}
    (folder / MANIFEST_NAME).write_text(json.dumps(NOT_OURS[content](record)), encoding="utf-8")
    with (
        pytest.raises(OutputError, match="not a previous output of g2vlm"),
        staged_outputs([folder], kinds=["reconstruction"], overwrite=True) as (staging,),
    ):
        (staging / "new.txt").write_text("new")
    assert (folder / "data.bin").read_bytes() == b"theirs" and names(tmp_path) == ["out"]


def test_a_linked_manifest_does_not_make_a_users_copy_an_output(tmp_path):
    """A user's copy of an output whose manifest is a link to the original's (as `cp -rs` or a backup tool makes)
    is the user's folder: --overwrite is refused and the copied files stay."""
    original = make_output(tmp_path / "out", {"cameras.json": b"{}"})
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "cameras.json").write_bytes(b"{}")
    (copy / MANIFEST_NAME).symlink_to(original / MANIFEST_NAME)
    with (
        pytest.raises(OutputError, match="not a previous output of g2vlm"),
        staged_outputs([copy], kinds=["reconstruction"], overwrite=True) as (staging,),
    ):
        (staging / "new.txt").write_text("new")
    assert names(copy) == [MANIFEST_NAME, "cameras.json"] and (copy / "cameras.json").read_bytes() == b"{}"


def test_seal_returns_the_record_it_wrote(tmp_path):
    """`seal` (public) hands its caller the manifest it wrote into the folder."""
    staging = tmp_path / "staged"
    staging.mkdir()
    (staging / "a.txt").write_bytes(b"a")
    manifest = seal(staging, "colmap")
    assert manifest == json.loads((staging / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["kind"] == "colmap" and list(manifest["files"]) == ["a.txt"]


@pytest.mark.parametrize("entry", [{}, {"size": 6}, None, "theirs"], ids=["empty", "no-sha256", "null", "a-string"])
def test_a_file_whose_manifest_entry_is_damaged_is_not_taken_for_ours(tmp_path, entry):
    """A listed file whose entry lacks its size or sha256 (a damaged or hand-edited manifest) cannot be shown to be
    unchanged: --overwrite is refused naming it, and it stays."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"theirs")
    (folder / "cameras.json").write_bytes(b"{}")
    _record(folder, {"data.bin": entry, "cameras.json": _entry(b"{}")})
    with (
        pytest.raises(OutputError, match=r"holds 1 path\(s\) .*: data\.bin;"),
        staged_outputs([folder], kinds=["reconstruction"], overwrite=True) as (staging,),
    ):
        (staging / "new.txt").write_text("new")
    assert (folder / "data.bin").read_bytes() == b"theirs" and names(tmp_path) == ["out"]


@pytest.mark.parametrize("where", ["above", "absolute"])
def test_files_a_manifest_lists_outside_its_folder_are_never_deleted(tmp_path, where):
    """A manifest listing a path outside its folder (`../notes.txt`, or an absolute path) with the file's very size
    and sha256: replacing the folder deletes what is in it, never that file."""
    outside = tmp_path / "notes.txt"
    outside.write_bytes(b"mine")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "cameras.json").write_bytes(b"{}")
    listed = "../notes.txt" if where == "above" else str(outside)
    _record(folder, {listed: _entry(b"mine"), "cameras.json": _entry(b"{}")})
    with staged_outputs([folder], kinds=["reconstruction"], overwrite=True) as (staging,):
        (staging / "new.txt").write_text("new")
    assert outside.read_bytes() == b"mine" and names(tmp_path) == ["notes.txt", "out"]
    assert names(folder) == [MANIFEST_NAME, "new.txt"]


def test_an_old_leftover_keeps_the_folder_holding_a_users_file_and_says_so(tmp_path):
    """A killed swap's old folder is emptied of its own files; a subfolder holding a user's file stays (no error),
    and so does the old folder, which is not reported as removed."""
    make_output(tmp_path / "scene", {"new.txt": b"new"})
    make_output(tmp_path / "built", {"depth/d.png": b"png", "depth/deeper/e.png": b"png", "cameras.json": b"{}"})
    old = tmp_path / ".scene.g2vlm-old.abcd1234"
    (tmp_path / "built").rename(old)
    (old / "depth" / "mine.txt").write_text("mine")
    assert clean_leftovers(tmp_path / "scene") == []
    assert names(old) == [MANIFEST_NAME, "depth"] and names(old / "depth") == ["mine.txt"]


def test_an_old_leftover_is_not_emptied_of_folders_through_a_link(tmp_path):
    """A killed swap's old folder where a folder the manifest lists became a link to a user's folder: the user's
    empty subfolder at the link's end is not removed."""
    make_output(tmp_path / "scene", {"new.txt": b"new"})
    make_output(tmp_path / "built", {"depth/sub/d.png": b"png"})
    old = tmp_path / ".scene.g2vlm-old.abcd1234"
    (tmp_path / "built").rename(old)
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    shutil.rmtree(old / "depth")
    (old / "depth").symlink_to(theirs, target_is_directory=True)
    clean_leftovers(tmp_path / "scene")
    assert (theirs / "sub").is_dir() and (old / "depth").is_symlink()
