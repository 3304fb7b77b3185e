"""Issue 30: the output layer's own guarantees (manifest, no-replace swap, locks of nested outputs, leftovers, a
SIGKILLed writer). The six data-loss cases through the command lines are in test_ownership_cases.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ownership_world import CONVERT_INPUT, Run, play

from g2vlm_hf.output_manifest import MANIFEST_NAME, read_manifest, write_staging_manifest
from g2vlm_hf.rename_noreplace import rename_noreplace
from g2vlm_hf.safe_output import (
    OutputError,
    check_output_dir,
    clean_leftovers,
    lock_path,
    output_lock,
    staged_outputs,
    swap_in_all,
)

needs_checkpoint = pytest.mark.skipif(
    not CONVERT_INPUT.is_dir(), reason="needs the official tiny fixture (set G2VLM_FIXTURES)"
)


@needs_checkpoint
def test_convert_overwrite_replaces_its_own_output_and_keeps_the_record(tmp_path, monkeypatch):
    world = play(tmp_path, [Run("convert", "model"), Run("convert", "model", overwrite=True)], monkeypatch)
    manifest = read_manifest(tmp_path / "model")
    assert manifest["kind"] == "converted-model" and "config.json" in manifest["files"]
    assert world.outputs[tmp_path / "model"][0] == "converted-model"
    weights = tmp_path / "model" / "model.safetensors"
    assert oct(weights.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_overwrite_of_an_unchanged_output_of_the_same_kind_works(tmp_path, monkeypatch):
    steps = [Run("reconstruct", "out", colmap="sparse"), Run("reconstruct", "out", True, colmap="sparse")]
    world = play(tmp_path, steps, monkeypatch)
    assert set(world.outputs) == {tmp_path / "out", tmp_path / "sparse"}
    assert read_manifest(tmp_path / "sparse")["kind"] == "colmap"


# ------------------------------------------------------------------------------------------------ the layer itself


def make_output(target: Path, files: dict[str, bytes], kind: str = "reconstruction") -> Path:
    with staged_outputs([target], kinds=[kind]) as (staging,):
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
    return target


def test_the_refusal_names_every_foreign_path_and_deletes_nothing(tmp_path):
    output = make_output(tmp_path / "out", {"cameras.json": b"{}", "depth/d.png": b"png"})
    (output / "notes.txt").write_text("mine")
    (output / "depth" / "d.png").write_bytes(b"edited")
    (output / "cameras.json").write_bytes(b"[]")  # same size, other bytes
    (output / "extra").mkdir()
    os.symlink(tmp_path, output / "link")
    with pytest.raises(OutputError) as refusal:
        check_output_dir(output, kind="reconstruction", overwrite=True)
    message = str(refusal.value)
    assert all(name in message for name in ("notes.txt", "depth/d.png", "cameras.json", "extra/", "link")), message
    assert (output / "notes.txt").read_text() == "mine" and (output / "depth" / "d.png").read_bytes() == b"edited"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_output_folder_gets_the_mode_mkdir_gives_it(tmp_path, umask):
    """The staging folder (made private by mkdtemp) becomes the output: it gets the mode of a folder made with mkdir
    under the user's umask. Tests run as root, which reads any folder, so only the mode itself shows a mistake."""
    previous = os.umask(umask)
    try:
        output = make_output(tmp_path / "out", {"depth/a.png": b"a"})
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    expected = oct((tmp_path / "plain").stat().st_mode & 0o7777)
    for folder in (output, output / "depth"):
        assert oct(folder.stat().st_mode & 0o7777) == expected, folder


def test_a_link_to_an_earlier_output_is_followed_as_the_early_check_follows_it(tmp_path):
    """The early check resolves the path; the transaction used to stage beside the link and refuse it at the swap,
    after all the work."""
    real = make_output(tmp_path / "real", {"a.txt": b"old"})
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    assert check_output_dir(link, kind="reconstruction", overwrite=True) == real
    with staged_outputs([link], kinds=["reconstruction"], overwrite=True) as (staging,):
        (staging / "a.txt").write_bytes(b"new")
    assert link.is_symlink() and link.resolve() == real and (real / "a.txt").read_bytes() == b"new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "real"]  # no staging, old folder or lock left


def test_a_link_to_a_users_folder_is_refused_before_any_work(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.bin").write_bytes(b"theirs")
    link = tmp_path / "out"
    link.symlink_to(theirs, target_is_directory=True)
    worked = []
    with (
        pytest.raises(OutputError, match=r"no .* manifest"),
        staged_outputs([link], kinds=["reconstruction"], overwrite=True) as stagings,
    ):
        worked.append(stagings)
    assert not worked and (theirs / "data.bin").read_bytes() == b"theirs"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "theirs"]


def test_an_output_under_the_home_folder_is_written_there(tmp_path, monkeypatch):
    """`~` is expanded by the check and the lock; the staging and the swap used the literal path, writing `./~/out`."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert check_output_dir("~/out", kind="reconstruction") == home / "out"
    make_output("~/out", {"a.txt": b"a"})
    assert (home / "out" / "a.txt").read_bytes() == b"a" and read_manifest(home / "out")["kind"] == "reconstruction"
    assert list(work.iterdir()) == []


def test_the_longest_name_accepted_is_staged_and_swapped_and_a_longer_one_is_refused(tmp_path):
    """Names are limited to 255 bytes by the file system; the staging folder beside an output adds 24 characters."""
    for name in ("n" * 215, "é" * 107):  # 215 and 214 bytes
        target = check_output_dir(tmp_path / name, kind="reconstruction")
        make_output(target, {"a.txt": b"first"})
        with staged_outputs([target], kinds=["reconstruction"], overwrite=True) as (staging,):  # old folder aside
            (staging / "a.txt").write_bytes(b"second")
        assert (target / "a.txt").read_bytes() == b"second"
    for name in ("n" * 216, "é" * 108):  # 216 bytes
        with pytest.raises(OutputError, match="too long"):
            check_output_dir(tmp_path / name, kind="reconstruction")
    assert sorted(len(path.name.encode()) for path in tmp_path.iterdir()) == [214, 215]


@pytest.mark.parametrize("added", [8, 11])
def test_a_long_refusal_names_eight_paths_and_counts_the_rest(tmp_path, added):
    output = make_output(tmp_path / "out", {"cameras.json": b"{}"})
    for index in range(added):
        (output / f"notes{index:02d}.txt").write_text("mine")
    with pytest.raises(OutputError) as refusal:
        check_output_dir(output, kind="reconstruction", overwrite=True)
    message = str(refusal.value)
    assert f"holds {added} path(s)" in message and sum(f"notes{i:02d}.txt" in message for i in range(added)) == 8
    assert ("more)" in message) == (added > 8) and (added == 8 or f"({added - 8} more)" in message), message


def test_a_file_removed_from_an_output_is_not_foreign(tmp_path):
    output = make_output(tmp_path / "out", {"a.txt": b"a", "b.txt": b"b"})
    (output / "a.txt").unlink()
    assert check_output_dir(output, kind="reconstruction", overwrite=True) == output


def test_the_swap_refuses_a_target_that_appeared_after_the_checks(tmp_path):
    target = tmp_path / "out"
    check_output_dir(target, kind="reconstruction")
    with pytest.raises(OutputError, match="not empty"), staged_outputs([target], kinds=["reconstruction"]) as (s,):
        (s / "cameras.json").write_text("new")
        (target / "theirs").mkdir(parents=True)
        (target / "theirs" / "data.bin").write_bytes(b"theirs")
    assert (target / "theirs" / "data.bin").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging removed, lock released


def test_a_target_that_appeared_before_the_lock_is_refused_before_any_work(tmp_path):
    """Checked before the work (the CLI's early check) and again under the lock, before the block runs: a folder of
    the user's that appeared in between stops the run before the model works, not at the swap after it."""
    target = tmp_path / "out"
    check_output_dir(target, kind="reconstruction")
    (target / "theirs").mkdir(parents=True)
    worked = []
    with pytest.raises(OutputError, match="not empty"), staged_outputs([target], kinds=["reconstruction"]) as (s,):
        worked.append(s)
    assert not worked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == ["theirs"]


def test_a_file_added_to_the_previous_output_just_before_the_swap_is_kept(tmp_path, monkeypatch):
    """Between the check under the lock and the rename aside, a user file appears: the re-check of the folder renamed
    aside finds it and puts the folder back."""
    output = make_output(tmp_path / "out", {"cameras.json": b"old"})
    import g2vlm_hf.safe_output as layer

    real_mkdtemp = layer.tempfile.mkdtemp

    def mkdtemp_then_user_writes(*args, **kwargs):
        if ".g2vlm-old." in kwargs.get("prefix", ""):
            (output / "late.txt").write_text("late")
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(layer.tempfile, "mkdtemp", mkdtemp_then_user_writes)
    with (
        pytest.raises(OutputError, match=r"late\.txt"),
        staged_outputs([output], kinds=["reconstruction"], overwrite=True) as (s,),
    ):
        (s / "cameras.json").write_text("new")
    assert (output / "late.txt").read_text() == "late" and (output / "cameras.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _failing_swap(monkeypatch, staging: Path, before_rename) -> None:
    """Run `before_rename()` when `staging` is renamed to its output, then do the rename for real."""
    import g2vlm_hf.safe_output as layer

    real = layer.rename_noreplace

    def rename(source, target):
        if Path(source) == staging:
            before_rename(Path(target))
        real(source, target)

    monkeypatch.setattr(layer, "rename_noreplace", rename)


def _no_space(target: Path) -> None:
    raise OSError(28, "No space left on device")


def test_when_one_swap_fails_the_outputs_already_swapped_get_their_content_back(tmp_path, monkeypatch):
    first = make_output(tmp_path / "scene", {"cameras.json": b"old"})
    staged_a, staged_b = tmp_path / ".scene.staged", tmp_path / ".sparse.staged"
    for folder, name in ((staged_a, "cameras.json"), (staged_b, "cameras.txt")):
        folder.mkdir()
        (folder / name).write_text("new")
    _failing_swap(monkeypatch, staged_b, _no_space)
    with pytest.raises(OSError, match="No space"):
        swap_in_all(
            [(staged_a, first), (staged_b, tmp_path / "sparse")], kinds=["reconstruction", "colmap"], overwrite=True
        )
    assert (first / "cameras.json").read_text() == "old" and (staged_a / "cameras.json").read_text() == "new"
    assert not (tmp_path / "sparse").exists()


def test_a_failed_rename_puts_the_previous_output_back_in_place(tmp_path, monkeypatch):
    previous = make_output(tmp_path / "scene", {"cameras.json": b"old"})
    staged = tmp_path / ".scene.staged"
    staged.mkdir()
    (staged / "cameras.json").write_text("new")

    _failing_swap(monkeypatch, staged, _no_space)
    with pytest.raises(OSError, match="No space"):
        swap_in_all([(staged, previous)], kinds=["reconstruction"], overwrite=True)
    assert (previous / "cameras.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".scene.staged", "scene"]  # nothing left aside


def test_a_folder_appearing_at_the_output_during_the_swap_is_left_and_the_previous_output_kept(tmp_path, monkeypatch):
    previous = make_output(tmp_path / "scene", {"cameras.json": b"old"})
    staged = tmp_path / ".scene.staged"
    staged.mkdir()
    (staged / "cameras.json").write_text("new")

    def theirs_appears(target: Path) -> None:  # after the previous output was moved aside
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")

    _failing_swap(monkeypatch, staged, theirs_appears)
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        swap_in_all([(staged, previous)], kinds=["reconstruction"], overwrite=True)
    assert [path.name for path in previous.iterdir()] == ["theirs.txt"]
    (aside,) = tmp_path.glob(".scene.g2vlm-old.*")  # the place was taken: the previous output waits there
    assert (aside / "cameras.json").read_text() == "old" and (staged / "cameras.json").read_text() == "new"


def test_rename_noreplace_never_replaces(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.mkdir()
    target.mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(source, target)  # not even an empty folder
    target.rmdir()
    target.write_text("a file")
    with pytest.raises(FileExistsError):
        rename_noreplace(source, target)
    target.unlink()
    rename_noreplace(source, target)
    assert target.is_dir() and not source.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_nested_outputs_exclude_each_other_through_the_lock(tmp_path):
    with output_lock(tmp_path / "out" / "nest"):
        with pytest.raises(OutputError, match="being written"), output_lock(tmp_path / "out" / "nest" / "inner"):
            pass
        with output_lock(tmp_path / "out" / "beside"):  # siblings do not
            pass
    with output_lock(tmp_path / "out" / "nest" / "inner"), output_lock(tmp_path / "out" / "nest" / "other"):
        pass  # two writers inside a folder that nobody writes
    assert not (tmp_path / "out").exists()  # the locks' folders, created for them, removed with them
    stale = lock_path(tmp_path / "out" / "nest")
    stale.parent.mkdir()
    stale.write_text(json.dumps({"pid": _dead_pid(), "host": "here", "command": "g2vlm", "since": "then"}) + "\n")
    with output_lock(tmp_path / "out" / "nest" / "inner"), output_lock(tmp_path / "out" / "nest" / "other"):
        pass  # ... nor one whose writer was killed, leaving its lock file: both share it


def test_a_writer_that_is_refused_is_told_who_holds_the_output(tmp_path):
    with output_lock(tmp_path / "out"), pytest.raises(OutputError) as refusal, output_lock(tmp_path / "out"):
        pass
    message = str(refusal.value)
    assert message.startswith(f"Output {tmp_path / 'out'} is being written by process {os.getpid()} on "), message
    assert str(lock_path(tmp_path / "out")) in message


def test_leftovers_are_matched_by_exact_name_and_manifest(tmp_path):
    """`scene[1]` is no glob: a leftover of `scene1` (or a user's look-alike folder) is not touched."""
    make_output(tmp_path / "built", {"cameras.json": b"{}"})
    (tmp_path / "built").rename(tmp_path / ".scene1.g2vlm-old.abcd1234")
    look_alike = tmp_path / ".scene[1].g2vlm-old.zzzz9999"
    look_alike.mkdir()
    (look_alike / "mine.txt").write_text("mine")
    assert clean_leftovers(tmp_path / "scene[1]") == []
    assert not (tmp_path / "scene[1]").exists() and (look_alike / "mine.txt").read_text() == "mine"
    assert (tmp_path / ".scene1.g2vlm-old.abcd1234" / "cameras.json").is_file()
    clean_leftovers(tmp_path / "scene1")  # its own: restored
    assert (tmp_path / "scene1" / "cameras.json").read_text() == "{}"


def test_only_staging_leftovers_of_this_output_whose_writer_is_gone_are_removed(tmp_path):
    """Beside `scene`: a dead writer's staging folder and one naming no writer (removed), and what must stay: a live
    writer's, one staging another output, a user's folder with a staging name but no manifest, a link with a staging
    name to a dead writer's folder, and an old output the user renamed to keep (not a tempfile suffix)."""
    make_output(tmp_path / "scene", {"cameras.json": b"now"})

    def staging(name: str, target: str = "scene", pid: int | None = None, recorded: bool = True) -> Path:
        """A staging folder of ours; `pid` replaces its writer's, `recorded=False` drops the writer record."""
        folder = tmp_path / name
        folder.mkdir()
        write_staging_manifest(folder, target)
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        if not recorded:
            del manifest["writer"]
        elif pid is not None:
            manifest["writer"]["pid"] = pid
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
        (folder / "part.bin").write_bytes(b"x")
        return folder

    dead = _dead_pid()
    gone = [
        staging(".scene.g2vlm-staging.dead0001", pid=dead),
        staging(".scene.g2vlm-staging.nobody01", recorded=False),
    ]
    kept = [
        staging(".scene.g2vlm-staging.live0001"),  # this process: alive
        staging(".scene.g2vlm-staging.other001", target="scene2", pid=dead),
        tmp_path / ".scene.g2vlm-staging.user0001",
        tmp_path / ".scene.g2vlm-staging.link0001",
    ]
    kept[2].mkdir()
    (kept[2] / "part.bin").write_bytes(b"mine")
    kept[3].symlink_to(staging("elsewhere", pid=dead), target_is_directory=True)
    make_output(tmp_path / "built", {"cameras.json": b"kept by the user"})
    (tmp_path / "built").rename(tmp_path / ".scene.g2vlm-old.keep-this")
    assert clean_leftovers(tmp_path / "scene") == gone
    assert not any(folder.exists() for folder in gone) and all((folder / "part.bin").is_file() for folder in kept)
    assert (tmp_path / "elsewhere" / "part.bin").is_file() and kept[3].is_symlink()
    assert (tmp_path / ".scene.g2vlm-old.keep-this" / "cameras.json").read_bytes() == b"kept by the user"
    assert (tmp_path / "scene" / "cameras.json").read_bytes() == b"now"


def test_an_old_leftover_is_emptied_of_its_own_files_only(tmp_path):
    make_output(tmp_path / "scene", {"new.txt": b"new"})
    make_output(tmp_path / "built", {"cameras.json": b"{}"})
    old = tmp_path / ".scene.g2vlm-old.abcd1234"
    (tmp_path / "built").rename(old)
    (old / "user.txt").write_text("mine")
    clean_leftovers(tmp_path / "scene")
    assert sorted(p.name for p in old.iterdir()) == [MANIFEST_NAME, "user.txt"]


KILLED_WRITER = """
import sys, time
from pathlib import Path
from g2vlm_hf.safe_output import staged_outputs
with staged_outputs([Path(sys.argv[1])], kinds=["reconstruction"], overwrite=True) as (staging,):
    for index in range(int(sys.argv[2])):
        (staging / f"part{index}.bin").write_bytes(b"x" * 1000)
    print("written", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("files", [0, 3])
def test_sigkill_of_a_writer_loses_nothing_and_its_leftover_goes(tmp_path, files):
    output = make_output(tmp_path / "scene", {"cameras.json": b"previous"})
    before = json.loads((output / MANIFEST_NAME).read_text())
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(output), str(files)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (output / "cameras.json").read_bytes() == b"previous" and read_manifest(output) == before
    staging = [p for p in tmp_path.iterdir() if ".g2vlm-staging." in p.name]
    assert len(staging) == 1 and clean_leftovers(output) == staging
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


WRITER_KILLED_AT_ITS_SWAP = """
import sys, time
from pathlib import Path
import g2vlm_hf.safe_output as safe_output
from g2vlm_hf.safe_output import staged_outputs

def stop_before_the_rename(source, target):
    print("sealed", flush=True)
    time.sleep(600)

safe_output.rename_noreplace = stop_before_the_rename
with staged_outputs([Path(sys.argv[1])], kinds=["reconstruction"], overwrite=True) as (staging,):
    (staging / "cameras.json").write_bytes(b"killed run")
"""


def test_a_writer_killed_between_its_seal_and_its_swap_leaves_nothing_after_the_next_run(tmp_path):
    """Killed with the previous output renamed aside and its own output sealed: a tidy-up without the lock puts the
    previous output back and keeps the sealed folder (it names no writer, and only the lock's holder is ever between
    seal and swap); the next run, holding the lock, removes it."""
    output = make_output(tmp_path / "scene", {"cameras.json": b"previous"})
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER_KILLED_AT_ITS_SWAP, str(output)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "sealed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not output.exists()  # killed between its two renames: the previous output lies aside
    (sealed,) = [p for p in tmp_path.iterdir() if ".g2vlm-staging." in p.name]
    assert read_manifest(sealed)["state"] == "complete"
    assert clean_leftovers(output) == [] and (sealed / "cameras.json").read_bytes() == b"killed run"
    assert (output / "cameras.json").read_bytes() == b"previous"
    with staged_outputs([output], kinds=["reconstruction"], overwrite=True) as (staging,):
        (staging / "cameras.json").write_bytes(b"next run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]
    assert (output / "cameras.json").read_bytes() == b"next run"
