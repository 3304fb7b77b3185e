"""What a mutation-testing pass of the output layer (`safe_output`) found unpinned, and the bugs it led to: behaviour
a user relies on that a changed line of the module kept passing every earlier test (a default of `overwrite`, an
output inside an input folder, the lock file's name, its record and its shared locks, a lock file removed while it is
taken, the staging folder's place, the cleaning of leftovers and its result, the liveness check of a staging folder's
writer, a leftover emptied through a linked folder, a previous output put back before the check). Each test names the
wrong behaviour it catches; all work on real files and folders in tmp_path, and real processes where a lock or a
writer is at stake."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_ownership import make_output  # an earlier output, written through the real transaction

from g2vlm_hf.output_manifest import MANIFEST_NAME, write_staging_manifest
from g2vlm_hf.safe_output import (
    OutputError,
    check_output_dir,
    clean_leftovers,
    lock_path,
    make_staging_dir,
    output_lock,
    staged_outputs,
    swap_in_all,
)


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ------------------------------------------------------------------------------------------------ the early check


def test_an_earlier_output_is_refused_without_overwrite_by_default(tmp_path):
    """`check_output_dir` without `overwrite` must refuse a non-empty earlier output (a default of True would let a
    library caller replace it silently)."""
    output = make_output(tmp_path / "out", {"a.txt": b"a"})
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(output, kind="reconstruction")
    assert check_output_dir(output, kind="reconstruction", overwrite=True) == output
    assert (output / "a.txt").read_bytes() == b"a"


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    """An output inside the input folder (the next run would read it as input; a converter would write into the
    checkpoint) is refused; one beside it, or inside the folder of an input file, is not."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"png")
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output_dir(photos / "scene", kind="reconstruction", inputs=[photos])
    with pytest.raises(OutputError, match="lies inside the input"):
        check_output_dir(photos / "deeper" / "scene", kind="reconstruction", inputs=[tmp_path / "x", photos])
    assert check_output_dir(tmp_path / "scene", kind="reconstruction", inputs=[photos]) == tmp_path / "scene"
    assert check_output_dir(photos / "scene", kind="reconstruction", inputs=[photos / "a.png"]) == photos / "scene"
    assert names(photos) == ["a.png"]


# ------------------------------------------------------------------------------------------------------- the lock


def test_the_lock_file_is_the_documented_name_beside_the_output(tmp_path):
    """Writers of the same output exclude each other through `.NAME.g2vlm-lock` beside it (the name two installs of
    the package, or a user's script, agree on); a different name would still lock but not against them."""
    output = tmp_path / "scene"
    assert lock_path(str(output)) == tmp_path / ".scene.g2vlm-lock"  # a str as the signature allows
    with output_lock(output):
        assert names(tmp_path) == [".scene.g2vlm-lock"]
        assert f'"pid": {os.getpid()}' in (tmp_path / ".scene.g2vlm-lock").read_text()
    assert names(tmp_path) == []


def test_a_lock_file_that_cannot_be_made_is_an_output_error_and_leaves_no_new_folder(tmp_path):
    """A lock file the file system refuses (its name too long) is reported as an OutputError naming it, and the
    folders made for it are removed again (not an UnboundLocalError, not empty folders left around)."""
    output = tmp_path / "new" / "deeper" / ("n" * 250)  # the lock file's name is 262 bytes long
    with pytest.raises(OutputError, match="cannot create its lock file"), output_lock(output):
        pass
    assert names(tmp_path) == []


TRY_EXCLUSIVE = """
import fcntl, sys
handle = open(sys.argv[1])
try:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def test_a_dead_writers_lock_file_taken_over_names_the_new_writer(tmp_path):
    """A writer taking over the lock file a killed writer left replaces its record: one refused meanwhile is told the
    live writer's pid, not the dead one's (or a vague "another process" from two records run together)."""
    output = tmp_path / "scene"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"pid": dead.pid, "host": "here", "command": "g2vlm killed", "since": "then"}
    lock_path(output).write_text(json.dumps(record) + "\n")
    with output_lock(output), pytest.raises(OutputError) as refusal, output_lock(output):
        pass
    assert f"being written by process {os.getpid()} on " in str(refusal.value), refusal.value
    assert f"process {dead.pid} " not in str(refusal.value)


def another_process_sees(lock: Path) -> str:
    """Whether another process can take an exclusive lock on `lock` now ("free") or not ("held")."""
    return subprocess.run(
        [sys.executable, "-c", TRY_EXCLUSIVE, str(lock)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_lock_file_its_previous_holder_removed_meanwhile_is_not_held_in_vain(tmp_path, monkeypatch):
    """The previous writer removes its lock file as it ends: if that happens between our open and our lock, the lock
    we got is on a removed file, which the next writer does not see; the lock is taken again on the file at the path
    (the next writer is refused) instead of two writers each holding a lock of their own."""
    import g2vlm_hf.safe_output as layer

    output = tmp_path / "scene"
    path = lock_path(output)
    path.write_text("")  # the previous writer's
    real_try_lock, calls = layer._try_lock, []

    def previous_writer_ends_now(handle, **kwargs):
        if not calls:
            path.unlink()
        calls.append(handle)
        return real_try_lock(handle, **kwargs)

    monkeypatch.setattr(layer, "_try_lock", previous_writer_ends_now)
    with output_lock(output):
        assert path.is_file() and another_process_sees(path) == "held"
    assert len(calls) >= 2 and names(tmp_path) == []


def test_an_inner_writer_keeps_its_shared_lock_on_the_outer_lock_file_until_it_ends(tmp_path):
    """A writer of `out/nest/inner` holds a shared lock on `out/.nest.g2vlm-lock` (here left by a killed writer of
    `out/nest`) for its whole run, not only while it looks: a writer of `out/nest` starting meanwhile is refused,
    whether this package or another process takes the exclusive lock."""
    stale = lock_path(tmp_path / "out" / "nest")
    stale.parent.mkdir()
    stale.write_text("")

    with output_lock(tmp_path / "out" / "nest" / "inner"):
        assert another_process_sees(stale) == "held"
        with pytest.raises(OutputError, match="being written"), output_lock(tmp_path / "out" / "nest"):
            pass
    assert another_process_sees(stale) == "free"
    with output_lock(tmp_path / "out" / "nest"):
        pass


# ------------------------------------------------------------------------------------------------------ leftovers


# ------------------------------------------------------------------------------------------------------- the swap


def test_the_staging_folder_is_a_hidden_folder_beside_the_output(tmp_path):
    """The staging folder is `.NAME.g2vlm-staging.XXXXXXXX` beside the output, its folders made if missing: staged
    in the system's temporary folder (often another file system), the final rename would fail after all the work,
    and under another name the next run would not recognise it as a leftover."""
    output = tmp_path / "new" / "deeper" / "scene"
    staging = make_staging_dir(output)
    assert staging.parent == output.parent and staging.name.startswith(".scene.g2vlm-staging.")
    assert len(staging.name) == len(".scene.g2vlm-staging.") + 8 and names(staging) == [MANIFEST_NAME]
    assert clean_leftovers(output) == [] and staging.is_dir()  # its writer, this process, lives: kept
    shutil.rmtree(tmp_path / "new")
    with staged_outputs([output], kinds=["reconstruction"]) as (staging,):
        assert staging.parent == output.parent and staging.name.startswith(".scene.g2vlm-staging.")
        (staging / "a.txt").write_bytes(b"a")
    assert names(output.parent) == ["scene"]


def test_outputs_and_kinds_of_different_lengths_are_refused_before_the_work(tmp_path):
    """`staged_outputs` with two outputs and one kind stops before the block runs (not after the work, at the swap),
    and makes nothing."""
    worked = []
    with (
        pytest.raises(ValueError, match="2 outputs but 1 kinds"),
        staged_outputs([tmp_path / "a", tmp_path / "b"], kinds=["reconstruction"]) as stagings,
    ):
        worked.append(stagings)
    assert not worked and names(tmp_path) == []


def test_swap_in_all_refuses_an_earlier_output_without_overwrite_and_returns_what_it_swapped(tmp_path):
    """`swap_in_all` (a library entry point) replaces an earlier output only with `overwrite`; it refuses a
    mismatch of outputs and kinds instead of swapping only some; it returns the outputs it swapped in."""

    def staged(name: str, data: bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "a.txt").write_bytes(data)
        return folder

    earlier = make_output(tmp_path / "out", {"a.txt": b"earlier"})
    with pytest.raises(OutputError, match="--overwrite"):
        swap_in_all([(staged(".s1", b"new"), earlier)], kinds=["reconstruction"])
    assert (earlier / "a.txt").read_bytes() == b"earlier"
    with pytest.raises(ValueError, match="2 outputs but 1 kinds"):
        swap_in_all([(tmp_path / ".s1", earlier), (staged(".s2", b"new"), tmp_path / "b")], kinds=["reconstruction"])
    assert (earlier / "a.txt").read_bytes() == b"earlier" and not (tmp_path / "b").exists()
    pairs = [(tmp_path / ".s1", earlier), (tmp_path / ".s2", tmp_path / "b")]
    assert swap_in_all(pairs, kinds=["reconstruction", "colmap"], overwrite=True) == [earlier, tmp_path / "b"]
    assert names(tmp_path) == ["b", "out"] and (earlier / "a.txt").read_bytes() == b"new"


@pytest.mark.parametrize("appears", ["file", "link to an earlier output"])
def test_a_file_or_link_that_appeared_at_the_target_is_refused_by_name_and_kept(tmp_path, appears):
    """The check at the swap refuses a file or a link put at the target during the run with its own message (an
    OutputError the command lines report in one line), not a NotADirectoryError from listing it or an error of the
    rename; the file, or the link and the output it points to, stay as they are."""
    earlier = make_output(tmp_path / "earlier", {"a.txt": b"earlier"})
    target = tmp_path / "out"
    with (
        pytest.raises(OutputError, match="is a file or a link, not a folder"),
        staged_outputs([target], kinds=["reconstruction"], overwrite=True) as (staging,),
    ):
        (staging / "a.txt").write_bytes(b"new")
        if appears == "file":
            target.write_bytes(b"theirs")
        else:
            target.symlink_to(earlier, target_is_directory=True)
    assert names(tmp_path) == ["earlier", "out"] and (earlier / "a.txt").read_bytes() == b"earlier"
    assert target.is_symlink() if appears != "file" else target.read_bytes() == b"theirs"


def test_clean_leftovers_returns_the_old_folders_it_removed_and_not_those_it_kept(tmp_path):
    """`clean_leftovers` returns the folders it removed: an old output holding only its own files is removed and
    named; one holding a user's file is emptied of the run's files, kept and not named."""
    make_output(tmp_path / "scene", {"now.txt": b"now"})
    for suffix, user_file in (("ours0001", False), ("user0001", True)):
        make_output(tmp_path / "built", {"cameras.json": b"{}"})
        (tmp_path / "built").rename(tmp_path / f".scene.g2vlm-old.{suffix}")
        if user_file:
            (tmp_path / f".scene.g2vlm-old.{suffix}" / "mine.txt").write_text("mine")
    assert clean_leftovers(tmp_path / "scene") == [tmp_path / ".scene.g2vlm-old.ours0001"]
    assert names(tmp_path) == [".scene.g2vlm-old.user0001", "scene"]
    assert names(tmp_path / ".scene.g2vlm-old.user0001") == [MANIFEST_NAME, "mine.txt"]


def test_clean_leftovers_of_an_output_in_a_folder_that_does_not_exist_does_nothing(tmp_path):
    """Nothing to clean where the output's folder does not exist yet: no error, and no folder or lock file made."""
    assert clean_leftovers(tmp_path / "new" / "scene") == []
    assert names(tmp_path) == []


HOLDER = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_clean_leftovers_keeps_a_held_lock_and_removes_a_dead_writers(tmp_path):
    """The lock file of a live writer (another process holding it) is never removed by the cleaning: removing it
    would let the next run create a new one and write the same output at the same time. Once that writer is killed,
    its lock file is stale and the cleaning removes it."""
    output = tmp_path / "scene"
    lock = lock_path(output)
    writer = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        inode = lock.stat().st_ino
        assert clean_leftovers(output) == []
        assert lock.stat().st_ino == inode
        with pytest.raises(OutputError, match="being written"), output_lock(output):
            pass
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert names(tmp_path) == [lock.name]
    assert clean_leftovers(output) == []
    assert names(tmp_path) == []


SLEEPER = "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('up', flush=True); time.sleep(600)"


def test_a_staging_folder_of_a_live_or_remote_writer_is_kept_and_its_writer_left_alone(tmp_path):
    """A staging folder is removed only when its writer is known dead: one whose writer runs here is kept, and
    checking that sends the writer no signal (it is not stopped); one written from another host (a shared folder),
    whose process cannot be checked from here, is kept even if its pid is free here."""
    writer = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "up"
        folders = {}
        for suffix, pid, host in (("live0001", writer.pid, None), ("host0001", _dead_pid(), "another-host")):
            folder = tmp_path / f".scene.g2vlm-staging.{suffix}"
            folder.mkdir()
            write_staging_manifest(folder, "scene")
            manifest = json.loads((folder / MANIFEST_NAME).read_text())
            manifest["writer"]["pid"] = pid
            manifest["writer"]["host"] = host or manifest["writer"]["host"]
            (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
            (folder / "part.bin").write_bytes(b"x")
            folders[suffix] = folder
        assert clean_leftovers(tmp_path / "scene") == []
        assert all((folder / "part.bin").is_file() for folder in folders.values())
        with pytest.raises(subprocess.TimeoutExpired):  # still running a second later
            writer.wait(timeout=1)
    finally:
        writer.kill()
        writer.wait()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_old_leftover_is_not_emptied_through_a_linked_folder(tmp_path):
    """A killed run's old folder whose `depth` folder the user replaced by a link to a folder of their own: cleaning
    it deleted the user's `depth/d.png` through the link (bytes identical to the file the manifest lists). Nothing
    behind a link is ours."""
    make_output(tmp_path / "scene", {"new.txt": b"new"})
    make_output(tmp_path / "built", {"depth/d.png": b"png", "cameras.json": b"{}"})
    old = tmp_path / ".scene.g2vlm-old.abcd1234"
    (tmp_path / "built").rename(old)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "d.png").write_bytes(b"png")
    shutil.rmtree(old / "depth")
    (old / "depth").symlink_to(mine, target_is_directory=True)
    clean_leftovers(tmp_path / "scene")
    assert (mine / "d.png").read_bytes() == b"png"
    assert names(old) == [MANIFEST_NAME, "depth"] and (old / "depth").is_symlink()  # kept: it holds a link
    assert names(tmp_path / "scene") == [MANIFEST_NAME, "new.txt"]


def test_an_output_restored_from_a_killed_swap_is_checked_before_the_work(tmp_path):
    """A run killed between the two renames of its swap leaves the previous output aside and nothing at the target.
    The next run puts it back when it locks the target, before its checks: it used to restore it only when making its
    staging folder, after the checks, so a run without --overwrite did all its work and was refused at the swap."""
    make_output(tmp_path / "built", {"cameras.json": b"previous"})
    (tmp_path / "built").rename(tmp_path / ".scene.g2vlm-old.abcd1234")
    worked = []
    with (
        pytest.raises(OutputError, match="--overwrite"),
        staged_outputs([tmp_path / "scene"], kinds=["reconstruction"]) as stagings,
    ):
        worked.append(stagings)
    assert not worked
    assert names(tmp_path) == ["scene"] and (tmp_path / "scene" / "cameras.json").read_bytes() == b"previous"
    with staged_outputs([tmp_path / "scene"], kinds=["reconstruction"], overwrite=True) as (staging,):
        (staging / "cameras.json").write_bytes(b"new")
    assert names(tmp_path) == ["scene"] and (tmp_path / "scene" / "cameras.json").read_bytes() == b"new"


def test_an_earlier_output_emptied_during_the_swap_is_replaced_without_an_error(tmp_path, monkeypatch):
    """An earlier output its user empties (manifest and all) between the last check at the target and its rename
    aside passed the check there as an empty folder and had no manifest to empty it by: a TypeError after the new
    output was already in place, and the empty old folder left beside it. Now the new output is swapped in and
    nothing else stays."""
    import g2vlm_hf.safe_output as layer

    earlier = make_output(tmp_path / "out", {"a.txt": b"earlier", "sub/b.txt": b"b"})
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "a.txt").write_bytes(b"new")
    checked, checks = layer.replace_problem, []

    def check_then_user_empties(target, kind, overwrite, **options):
        problem = checked(target, kind, overwrite, **options)
        checks.append(Path(target))
        if checks[-1] == earlier and checks.count(earlier) == 2:  # the last check before its rename aside
            shutil.rmtree(earlier)
            earlier.mkdir()
        return problem

    monkeypatch.setattr(layer, "replace_problem", check_then_user_empties)
    assert swap_in_all([(staging, earlier)], kinds=["reconstruction"], overwrite=True) == [earlier]
    assert checks.count(earlier) == 2  # the user emptied it after the last check at the target
    assert names(tmp_path) == ["out"] and (earlier / "a.txt").read_bytes() == b"new"
