"""What a mutation-testing pass of the output layer's record and last step (`output_manifest`, `rename_noreplace`)
found unpinned: behaviour a user relies on that a changed line of those modules kept passing every earlier test.
Each test names the wrong behaviour it catches; all work on real files and folders in tmp_path.

`rename_noreplace` is one system call on Linux; where that call is missing (another libc, a file system without
`RENAME_NOREPLACE`, macOS) a fallback does the same with `mkdir` and `rename`. Those systems are stood in for by a
C library that lacks the call or answers it with the error such a system gives; the folders moved are real."""

from __future__ import annotations

import ctypes
import errno
from pathlib import Path

import pytest

import g2vlm_hf.rename_noreplace as noreplace_module
from g2vlm_hf.rename_noreplace import rename_noreplace


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
