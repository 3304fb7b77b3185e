"""Issue 12: the converter and `g2vlm reconstruct` never delete or replace what they did not create."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_DIR
from test_export import make_scene

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.conversion.cli import main as g2vlm_convert
from g2vlm_hf.export import export_reconstruction
from g2vlm_hf.safe_output import MARKER, clean_leftovers, staged_outputs

pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")

CHECKPOINT = FIXTURE_DIR / "checkpoint"
VIEWS = [str(FIXTURE_DIR / "images" / f"view_{index}.png") for index in range(3)]


def one_line_error(capsys) -> str:
    """The error is one line of its own (progress bars may precede it), with no traceback."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("g2vlm"), err
    return errors[0]


def test_convert_refuses_the_current_folder_and_keeps_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    assert g2vlm_convert([str(CHECKPOINT), ".", "--overwrite"]) == 2
    assert "current folder" in one_line_error(capsys)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_convert_refuses_the_input_as_output(tmp_path, capsys):
    source = tmp_path / "official"
    shutil.copytree(CHECKPOINT, source)
    before = sorted(p.name for p in source.iterdir())
    assert g2vlm_convert([str(source), str(source), "--overwrite"]) == 2
    assert "is the input" in one_line_error(capsys)
    assert sorted(p.name for p in source.iterdir()) == before
    assert g2vlm_convert([str(source), str(tmp_path), "--overwrite"]) == 2  # an ancestor of the input
    assert "input" in one_line_error(capsys)


def test_convert_overwrite_onto_a_file_or_a_foreign_folder_is_refused(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("data")
    assert g2vlm_convert([str(CHECKPOINT), str(target), "--overwrite"]) == 2
    assert "is a file" in one_line_error(capsys)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("x")
    assert g2vlm_convert([str(CHECKPOINT), str(foreign), "--overwrite"]) == 2
    assert "not a previous output" in one_line_error(capsys)
    assert (foreign / "a.jpg").read_text() == "x" and target.read_text() == "data"


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_convert_reports_a_damaged_safetensors_file(tmp_path, capsys, damage):
    source = tmp_path / "official"
    shutil.copytree(CHECKPOINT, source)
    weights = source / "model.safetensors"
    weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[: weights.stat().st_size // 2])
    assert g2vlm_convert([str(source), str(tmp_path / "out")]) == 2
    assert "damaged or incomplete" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_convert_overwrite_keeps_the_previous_output_when_the_new_one_fails(
    tmp_path, converted_tiny, monkeypatch, capsys
):
    output = tmp_path / "converted"
    shutil.copytree(converted_tiny, output)
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("g2vlm_hf.conversion.convert_official.save_torch_state_dict", full_disk)
    assert g2vlm_convert([str(CHECKPOINT), str(output), "--overwrite"]) == 2
    assert "No space left" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no staging folder left behind


def reconstruct(model, output, *extra):
    return g2vlm(
        ["reconstruct", "--model", str(model), *VIEWS[: 3 if not extra else 2], "--output", str(output), *extra]
    )


def test_reconstruct_into_an_existing_output_needs_overwrite_and_leaves_no_stale_file(tmp_path, converted_tiny, capsys):
    output = tmp_path / "scene"
    assert reconstruct(converted_tiny, output) == 0
    assert (output / "depth" / "view_002.png").is_file()
    assert reconstruct(converted_tiny, output, "--dtype", "auto") == 2
    assert "--overwrite" in one_line_error(capsys)
    assert reconstruct(converted_tiny, output, "--overwrite") == 0
    depth_files = sorted(p.name for p in (output / "depth").iterdir())
    assert depth_files == ["view_000.png", "view_000_preview.png", "view_001.png", "view_001_preview.png"]
    assert oct((output / "cameras.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full_after(monkeypatch, files: int) -> None:
    """Make the export's file writes fail with ENOSPC once `files` files were written."""
    real_fdopen, opened = os.fdopen, []

    def fdopen(descriptor, mode="r", *args, **kwargs):
        handle = real_fdopen(descriptor, mode, *args, **kwargs)
        if "w" in mode:
            opened.append(handle)
            if len(opened) > files:

                def write(data):
                    raise OSError(errno.ENOSPC, "No space left on device")

                handle.write = write
        return handle

    monkeypatch.setattr("g2vlm_hf.export.atomic.os.fdopen", fdopen)


def test_reconstruct_on_a_full_disk_keeps_the_previous_result(tmp_path, converted_tiny, monkeypatch, capsys):
    # The disk fills after two files: without the staging folder, the new scene.glb and points.ply would already
    # have replaced (then, rolled back, removed) the previous ones.
    output = tmp_path / "scene"
    assert reconstruct(converted_tiny, output) == 0
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    disk_full_after(monkeypatch, files=2)
    assert reconstruct(converted_tiny, output, "--overwrite") == 2
    assert "No space left" in one_line_error(capsys)
    assert {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["scene"]


def test_export_on_a_full_disk_removes_the_files_it_wrote(tmp_path, monkeypatch):
    # the export's own layer, which library callers get without a staging folder
    disk_full_after(monkeypatch, files=3)
    with pytest.raises(OSError, match="No space left"):
        export_reconstruction(tmp_path / "scene", **make_scene())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["file", "under_file", "too_long", "max_points", "percentile"])
def test_reconstruct_checks_output_and_flags_before_loading_the_model(tmp_path, monkeypatch, capsys, case):
    (tmp_path / "f").write_text("x")
    output = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "out", "too_long": tmp_path / ("x" * 300)}
    extra = {"max_points": ["--max-points", "0"], "percentile": ["--confidence-percentile", "150"]}
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["reconstruct", "--model", str(tmp_path), *VIEWS, "--output", str(output.get(case, tmp_path / "o"))]
    assert g2vlm(argv + extra.get(case, [])) == 2
    err = one_line_error(capsys)
    expected = {
        "file": "is a file; give a folder path",
        "under_file": "lies under the file",
        "too_long": "is too long for the file system",
        "max_points": "--max-points",
        "percentile": "--confidence-percentile",
    }
    assert expected[case] in err


def test_missing_local_model_and_absent_cuda_are_reported_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["chat", "--image", VIEWS[0], "Where?"]
    assert g2vlm([*argv, "--model", "./no-such-model", "--device", "cpu"]) == 2
    assert "does not exist" in one_line_error(capsys)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert g2vlm([*argv, "--model", str(tmp_path), "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_line_error(capsys)


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path, converted_tiny):
    """SIGKILL a conversion while it writes; the next run removes its staging folder."""
    output = tmp_path / "converted"
    script = (
        "import sys, time\n"
        "import g2vlm_hf.conversion.convert_official as c\n"
        "def stall(*a, **k):\n"
        "    print('staged', flush=True); time.sleep(600)\n"
        "c.save_torch_state_dict = stall\n"
        "from g2vlm_hf.conversion.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(CHECKPOINT), str(output)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "staged"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".converted.g2vlm-staging.")]
    assert len(leftovers) == 1 and (leftovers[0] / MARKER).is_file()
    assert clean_leftovers(output) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_killed_swap_restores_the_previous_output(tmp_path):
    """Killed between the two renames of the swap: the previous output (it carries our manifest) is put back; a
    look-alike folder without our manifest is left alone."""
    with staged_outputs([tmp_path / "built"], kinds=["reconstruction"]) as (staging,):
        (staging / "cameras.json").write_text("{}")
    (tmp_path / "built").rename(tmp_path / ".scene.g2vlm-old.abcd1234")
    stranger = tmp_path / ".scene.g2vlm-old.zzzz9999"
    stranger.mkdir()
    (stranger / "mine.txt").write_text("not yours")
    clean_leftovers(tmp_path / "scene")
    assert (tmp_path / "scene" / "cameras.json").read_text() == "{}"
    assert (stranger / "mine.txt").read_text() == "not yours"


def test_a_run_that_writes_nothing_leaves_no_new_folders_around_its_output(converted_tiny, tmp_path, capsys):
    """A run refused inside its transaction (views of two sizes, found once the lock is held) removes the folders it
    created around `--output` again; a folder that held something before, or gets another writer's file, stays."""
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.open(VIEWS[0]).resize((300, 100)).save(wide)
    output = tmp_path / "new" / "deeper" / "scene"
    assert g2vlm(["reconstruct", "--model", str(converted_tiny), VIEWS[0], str(wide), "--output", str(output)]) == 2
    assert "resized to the first view's size" in one_line_error(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["wide.png"]

    (tmp_path / "kept").mkdir()
    outputs = [tmp_path / "kept" / "a" / "out", tmp_path / "b" / "out"]
    with pytest.raises(RuntimeError, match="model failed"), staged_outputs(outputs, kinds=["reconstruction"] * 2):
        (tmp_path / "b" / "notes.txt").write_text("another writer's file")
        raise RuntimeError("model failed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b", "kept", "wide.png"]
    assert list((tmp_path / "kept").iterdir()) == [] and [p.name for p in (tmp_path / "b").iterdir()] == ["notes.txt"]


def test_cli_error_via_the_entry_point_subprocess(tmp_path):
    started = time.monotonic()
    # the console script pip installed (pyproject's entry point), as a user runs it
    script = Path(sys.executable).with_name("g2vlm")
    result = subprocess.run(
        [str(script), "chat", "--model", "./typo-model", "--image", VIEWS[0], "Where?"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "g2vlm: error: Model folder ./typo-model does not exist."
    assert time.monotonic() - started < 60


def test_a_malformed_config_json_is_named(tmp_path, capsys):
    source = tmp_path / "official"
    shutil.copytree(CHECKPOINT, source)
    (source / "text_config.json").write_text("{not json")
    assert g2vlm_convert([str(source), str(tmp_path / "out")]) == 2
    assert "text_config.json is not valid JSON" in one_line_error(capsys)
