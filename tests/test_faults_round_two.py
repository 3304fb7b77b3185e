"""Issue 20 ("Nothing lost, round two"): inputs inside the output, --colmap inside the one staged transaction, one
writer at a time, EXIF orientation, evaluation ground truth of the wrong size, Ctrl-C, and the smaller refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.conversion.cli import main as g2vlm_convert
from g2vlm_hf.evaluation import cli as eval_cli
from g2vlm_hf.evaluation import write_scene
from g2vlm_hf.processing import G2VLMGeometryImageProcessor, load_image
from g2vlm_hf.safe_output import clean_leftovers, lock_path, output_lock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FIXTURE_DIR, default_ctrl_c, write_video
from hub_testing import fast_tiny_copy

pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")

VIEWS = [FIXTURE_DIR / "images" / f"view_{index}.png" for index in range(2)]
CHECKPOINT = FIXTURE_DIR / "checkpoint"


@pytest.fixture(scope="module")
def model(converted_tiny, tmp_path_factory) -> Path:
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("round2") / "model")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("g2vlm"), err
    return errors[0]


def no_model_load(monkeypatch):
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def reconstruct(model: Path, output: Path, *extra: str, views=VIEWS) -> int:
    return g2vlm(["reconstruct", "--model", str(model), *map(str, views), "--output", str(output), *extra])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ inputs in the output


def test_an_output_holding_the_input_images_is_refused_even_with_overwrite(model, tmp_path, monkeypatch, capsys):
    output = tmp_path / "o_x1"
    assert reconstruct(model, output) == 0
    photos = [output / f"my_photo_{index}.png" for index in range(2)]
    for view, photo in zip(VIEWS, photos):
        shutil.copy(view, photo)
    no_model_load(monkeypatch)
    assert reconstruct(model, output, "--overwrite", views=photos) == 2
    assert "is the input" in one_line_error(capsys)
    assert all(photo.read_bytes() == view.read_bytes() for view, photo in zip(VIEWS, photos))


def test_an_output_holding_the_input_folder_or_video_is_refused(model, tmp_path, monkeypatch, capsys):
    output = tmp_path / "o_vid"
    assert reconstruct(model, output) == 0
    no_model_load(monkeypatch)
    before = snapshot(output)
    base = ["reconstruct", "--model", str(model), "--output", str(output), "--overwrite"]
    assert g2vlm([*base, "--folder", str(output / "depth")]) == 2
    assert "input" in one_line_error(capsys)
    (output / "walk.mp4").write_bytes(b"a video")
    assert g2vlm([*base, "--video", str(output / "walk.mp4")]) == 2
    assert "input" in one_line_error(capsys)
    assert snapshot(output) == {**before, Path("walk.mp4"): b"a video"}


# --------------------------------------------------------------------------------------------------------- --colmap


def test_colmap_inside_the_output_exists_afterwards_and_printed_paths_are_real(model, tmp_path, capsys):
    output = tmp_path / "outputs" / "scene"
    assert reconstruct(model, output) == 0
    capsys.readouterr()
    assert reconstruct(model, output, "--overwrite", "--colmap", str(output / "sparse")) == 0
    printed = [Path(line.strip()) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert printed and all(path.is_file() for path in printed), printed
    assert (output / "sparse" / "cameras.txt").is_file() and (output / "cameras.json").is_file()
    assert output / "sparse" / "points3D.txt" in printed
    assert sorted(p.name for p in output.parent.iterdir()) == ["scene"]  # no staging folder or lock left


def test_colmap_elsewhere_needs_overwrite_and_a_colmap_folder(model, tmp_path, monkeypatch, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "cameras.txt").write_text("my calibration")
    no_model_load(monkeypatch)
    assert reconstruct(model, tmp_path / "scene", "--colmap", str(user)) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert reconstruct(model, tmp_path / "scene", "--colmap", str(user), "--overwrite") == 2
    assert "not a previous output" in one_line_error(capsys)
    assert (user / "cameras.txt").read_text() == "my calibration" and not (tmp_path / "scene").exists()


def test_colmap_elsewhere_is_replaced_with_the_output_unless_a_user_file_was_added(model, tmp_path, capsys):
    output, sparse = tmp_path / "scene", tmp_path / "sparse"
    assert reconstruct(model, output, "--colmap", str(sparse)) == 0
    assert reconstruct(model, output, "--colmap", str(sparse), "--overwrite") == 0  # unchanged: replaced
    printed = [Path(line.strip()) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert all(path.is_file() for path in printed) and sparse / "cameras.txt" in printed
    (sparse / "notes.txt").write_text("the user's, not ours")
    before = snapshot(output), snapshot(sparse)
    assert reconstruct(model, output, "--colmap", str(sparse), "--overwrite") == 2  # a file we did not write
    assert "notes.txt" in one_line_error(capsys)
    assert (snapshot(output), snapshot(sparse)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene", "sparse"]


def test_a_failure_after_the_colmap_export_keeps_both_previous_folders(model, tmp_path, monkeypatch, capsys):
    output, sparse = tmp_path / "scene", tmp_path / "sparse"
    assert reconstruct(model, output, "--colmap", str(sparse)) == 0
    before = snapshot(output), snapshot(sparse)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("g2vlm_hf.chat.answer", fail)
    assert reconstruct(model, output, "--colmap", str(sparse), "--overwrite", "--ask", "Where?") == 2
    assert "No space left" in one_line_error(capsys)
    assert (snapshot(output), snapshot(sparse)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene", "sparse"]


# ------------------------------------------------------------------------------------------------ one writer at a time

HOLD_LOCK = (
    "import sys, time\n"
    "from g2vlm_hf.safe_output import make_staging_dir, output_lock\n"
    "with output_lock(sys.argv[1]):\n"
    "    make_staging_dir(__import__('pathlib').Path(sys.argv[1]))\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


def test_a_second_writer_is_refused_and_a_dead_writers_lock_and_staging_are_taken_over(
    model, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "scene"
    assert reconstruct(model, output) == 0
    before = snapshot(output)
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with monkeypatch.context() as patch:
            no_model_load(patch)
            assert reconstruct(model, output, "--overwrite") == 2
        error = one_line_error(capsys)
        assert f"process {child.pid}" in error and "being written" in error
        staging = [p for p in tmp_path.iterdir() if ".g2vlm-staging." in p.name]
        assert len(staging) == 1 and clean_leftovers(output) == [] and staging[0].is_dir()  # its writer lives
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_path(output).is_file()  # the killed writer's lock file stays behind ...
    assert snapshot(output) == before
    assert reconstruct(model, output, "--overwrite") == 0  # ... and is taken over, its staging folder removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


def test_a_lock_held_in_this_process_blocks_convert_too(converted_tiny, tmp_path, capsys):
    output = tmp_path / "converted"
    with output_lock(output):
        assert g2vlm_convert([str(CHECKPOINT), str(output)]) == 2
        assert f"process {os.getpid()}" in one_line_error(capsys)
    assert not output.exists() and not lock_path(output).exists()


def test_the_lock_names_its_writer_but_hides_a_token(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/bin/g2vlm-convert", "in", "out", "--token", "hf_secret", "--token=hf_other"])
    with output_lock(tmp_path / "out") as path:
        writer = json.loads(path.read_text())
    assert writer["pid"] == os.getpid() and writer["command"] == "g2vlm-convert in out --token *** --token=***"
    assert not path.exists()


# --------------------------------------------------------------------------------------------------------------- EXIF


def phone_photo(path: Path) -> Path:
    """A 600x300 JPEG stored sideways with EXIF Orientation=6: displayed 300 wide, 600 high."""
    upright = np.zeros((600, 300, 3), np.uint8)
    upright[:100] = (255, 0, 0)  # red at the top of the displayed image
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 600 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_when_loading(tmp_path):
    photo = phone_photo(tmp_path / "phone.jpg")
    with Image.open(photo) as stored:
        assert stored.size == (600, 300)
    image = load_image(photo)
    assert image.size == (300, 600)
    assert image.getpixel((150, 20))[0] > 200 and image.getpixel((150, 580))[0] < 50
    with Image.open(photo) as opened:  # a PIL image opened by the user is turned too
        assert load_image(opened).size == (300, 600)
    pixels = G2VLMGeometryImageProcessor()(str(photo))["geometry_pixel_values"]
    assert tuple(pixels.shape[-2:]) == (1036, 518)


def test_exif_orientation_reaches_cameras_json_and_the_chat_inputs(model, tmp_path):
    from transformers import AutoProcessor

    photos = [phone_photo(tmp_path / f"phone_{index}.jpg") for index in range(2)]
    output = tmp_path / "scene"
    assert reconstruct(model, output, views=photos) == 0
    cameras = json.loads((output / "cameras.json").read_text())["cameras"]
    assert [(c["original"]["width"], c["original"]["height"]) for c in cameras] == [(300, 600)] * 2

    processor = AutoProcessor.from_pretrained(model)
    upright = tmp_path / "upright.png"  # the displayed pixels, without EXIF, as PIL's own EXIF transpose gives them
    with Image.open(photos[0]) as stored:
        ImageOps.exif_transpose(stored).convert("RGB").save(upright)

    def chat_inputs(image: Path):
        content = [{"type": "image", "image": str(image)}, {"type": "text", "text": "Where?"}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip

    from_photo, from_upright = chat_inputs(photos[0]), chat_inputs(upright)
    assert from_photo["input_ids"].tolist() == from_upright["input_ids"].tolist()
    for key in ("pixel_values", "geometry_pixel_values"):
        np.testing.assert_array_equal(from_photo[key].numpy(), from_upright[key].numpy())


def test_the_multi_view_pipeline_uses_the_displayed_size(model, tmp_path):
    from transformers import pipeline

    from g2vlm_hf.pipelines import G2VLMDepthEstimationPipeline

    photos = [str(phone_photo(tmp_path / f"phone_{index}.jpg")) for index in range(2)]
    estimator = pipeline("depth-estimation", model=str(model), pipeline_class=G2VLMDepthEstimationPipeline)
    results = estimator([photos])[0]
    assert [tuple(result["predicted_depth"].shape) for result in results] == [(600, 300)] * 2


# --------------------------------------------------------------------------------------------------------- evaluation


def eval_depth(data: Path, output: Path) -> int:
    argv = ["depth", "--model", "./never-loaded", "--data", str(data), "--output", str(output), "--device", "cpu"]
    return eval_cli.main(argv)


@pytest.fixture
def no_eval_model(monkeypatch):
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_eval_refuses_ground_truth_of_another_size_than_the_images(tmp_path, capsys, no_eval_model):
    images = np.zeros((2, 28, 70, 3), np.uint8)
    write_scene(tmp_path / "data" / "room", images)
    np.savez(tmp_path / "data" / "room" / "gt.npz", depth=np.ones((2, 70, 28)))  # transposed (write_scene refuses it)
    assert eval_depth(tmp_path / "data", tmp_path / "r.json") == 2
    error = one_line_error(capsys)
    assert "Scene room" in error and "28x70" in error and "70x28" in error
    assert not (tmp_path / "r.json").exists()


def test_eval_compares_ground_truth_with_the_displayed_size(tmp_path):
    from g2vlm_hf.evaluation.datasets import find_scenes

    scene = tmp_path / "data" / "phone"
    (scene / "images").mkdir(parents=True)
    for index in range(2):
        phone_photo(scene / "images" / f"{index}.jpg")
    np.savez(scene / "gt.npz", depth=np.ones((2, 600, 300)))
    assert find_scenes(tmp_path / "data", "depth")[0].depth.shape == (2, 600, 300)
    np.savez(scene / "gt.npz", depth=np.ones((2, 300, 600)))  # the stored, sideways size
    with pytest.raises(ValueError, match=r"Scene phone: image 0\.jpg is 600x300"):
        find_scenes(tmp_path / "data", "depth")


def test_eval_refuses_a_scene_without_ground_truth(tmp_path, capsys, no_eval_model):
    images = np.zeros((2, 28, 28, 3), np.uint8)
    write_scene(tmp_path / "data" / "a", images, depth=np.ones((2, 28, 28)))
    write_scene(tmp_path / "data" / "b", images, depth=np.ones((2, 28, 28)))
    (tmp_path / "data" / "b" / "gt.npz").unlink()
    assert eval_depth(tmp_path / "data", tmp_path / "r.json") == 2
    error = one_line_error(capsys)
    assert "1 scene folder(s)" in error and ": b." in error


def test_eval_names_a_scene_whose_depth_is_all_nan(tmp_path, capsys, no_eval_model):
    images = np.zeros((2, 28, 28, 3), np.uint8)
    write_scene(tmp_path / "data" / "good", images, depth=np.ones((2, 28, 28)))
    write_scene(tmp_path / "data" / "hall", images, depth=np.full((2, 28, 28), np.nan))
    assert eval_depth(tmp_path / "data", tmp_path / "r.json") == 2
    assert "Scene hall" in one_line_error(capsys)


def test_eval_names_the_scene_when_no_depth_is_left_after_max_depth(converted_tiny, tmp_path, capsys):
    images = np.full((2, 28, 28, 3), 128, np.uint8)
    write_scene(tmp_path / "data" / "far", images, depth=np.full((2, 28, 28), 100.0))
    argv = ["depth", "--model", str(converted_tiny), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "r")]
    assert eval_cli.main([*argv, "--device", "cpu", "--max-depth", "70", "--geometry-width", "28"]) == 2
    assert "Scene far" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------------------- Ctrl-C

STALL = (
    "import sys, time\n"
    "import {module} as m\n"
    "def stall(*a, **k):\n"
    "    print('writing', flush=True); time.sleep(600)\n"
    "m.{name} = stall\n"
    "from {cli} import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def interrupt(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    child = subprocess.Popen(
        [sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_ctrl_c,
    )  # fmt: skip
    line = child.stdout.readline()
    while line and line.strip() != "writing":
        line = child.stdout.readline()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_ctrl_c_during_the_export_says_one_line_and_keeps_the_previous_result(model, tmp_path):
    output = tmp_path / "scene"
    assert reconstruct(model, output) == 0
    before = snapshot(output)
    script = STALL.format(module="g2vlm_hf.export", name="write_scene", cli="g2vlm_hf.cli")
    result = interrupt(script, ["reconstruct", "--model", str(model), *map(str, VIEWS), "--output", str(output),
                                "--overwrite"])  # fmt: skip
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("g2vlm: interrupted")
    assert len([line for line in result.stderr.splitlines() if "interrupted" in line]) == 1
    assert snapshot(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


def test_ctrl_c_during_a_conversion_says_one_line(tmp_path):
    output = tmp_path / "converted"
    script = STALL.format(
        module="g2vlm_hf.conversion.convert_official", name="save_torch_state_dict", cli="g2vlm_hf.conversion.cli"
    )
    result = interrupt(script, [str(CHECKPOINT), str(output)])
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("g2vlm-convert: interrupted")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_an_evaluation_says_one_line(model, tmp_path):
    write_scene(tmp_path / "data" / "room", np.zeros((2, 28, 28, 3), np.uint8), depth=np.ones((2, 28, 28)))
    script = STALL.format(module="g2vlm_hf.evaluation.cli", name="predict_geometry", cli="g2vlm_hf.evaluation.cli")
    argv = ["depth", "--model", str(model), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "r.json")]
    result = interrupt(script, [*argv, "--device", "cpu"])
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("g2vlm-eval: interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ------------------------------------------------------------------------------------------------ checks before work


def test_a_read_only_output_location_is_refused_before_model_work(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    no_model_load(monkeypatch)
    try:
        assert reconstruct(tmp_path, locked / "scene") == 2
        assert "cannot write in" in one_line_error(capsys)
    finally:
        locked.chmod(0o755)


def test_a_mount_point_output_is_refused_before_model_work(tmp_path, monkeypatch, capsys):
    """A mount point (a drive, a folder bind-mounted into a container) cannot be renamed aside or replaced: refused
    before any model work, naming a folder to give instead (the run failed with EBUSY after all its work)."""
    from g2vlm_hf.safe_output import replace_problem

    mounted = tmp_path / "usb"
    mounted.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mounted or real_ismount(path))
    no_model_load(monkeypatch)
    assert reconstruct(tmp_path, mounted) == 2
    assert f"is a mount point (a drive, or a folder mounted into a container), which a run cannot replace as a whole; " \
        f"give a new folder inside it, e.g. {mounted / 'scene'}." in one_line_error(capsys)  # fmt: skip
    assert reconstruct(tmp_path, mounted / "scene", "--device", "bogus") == 2  # inside it: past the output checks
    assert "--device bogus" in one_line_error(capsys)
    if real_ismount("/proc"):  # a real one (non-empty: the mount point is what is named, even with --overwrite)
        assert "is a mount point" in replace_problem(Path("/proc"), "reconstruction", overwrite=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["chat", "--image", str(VIEWS[0]), ""], "question is empty"),
        (["chat", "--image", str(VIEWS[0]), "  "], "question is empty"),
        (["reconstruct", *map(str, VIEWS), "--output", "OUT", "--ask", ""], "--ask needs a question"),
        (["reconstruct", "--video", "v.mp4", "--every", "0", "--output", "OUT"], "--every must be at least 1"),
        (["reconstruct", "--video", "v.mp4", "--max-views", "0", "--output", "OUT"], "--max-views must be at least 1"),
    ],
)
def test_empty_questions_and_zero_counts_are_refused(tmp_path, monkeypatch, capsys, argv, expected):
    no_model_load(monkeypatch)
    argv = [str(tmp_path / "o") if item == "OUT" else item for item in argv]
    assert g2vlm([*argv[:1], "--model", str(tmp_path), *argv[1:]]) == 2
    assert expected in one_line_error(capsys)


def test_every_beyond_the_video_is_refused_with_the_frame_count(tmp_path, monkeypatch, capsys):
    frames = [Image.new("RGB", (56, 28), (60 * index, 0, 0)) for index in range(4)]
    video = write_video(tmp_path / "walk.mp4", frames, rate=5)
    no_model_load(monkeypatch)
    argv = ["reconstruct", "--model", str(tmp_path), "--video", str(video), "--output", str(tmp_path / "o")]
    assert g2vlm([*argv, "--every", "1000000000"]) == 2
    error = one_line_error(capsys)
    assert "keeps 1 of the 4 frames" in error and "at most 3" in error


def test_an_image_smaller_than_a_patch_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        G2VLMGeometryImageProcessor()(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ValueError, match="View 1 is 13x40"):
        G2VLMGeometryImageProcessor()([np.zeros((40, 40, 3), np.uint8), np.zeros((40, 13, 3), np.uint8)])
    assert G2VLMGeometryImageProcessor()(np.zeros((14, 14, 3), np.uint8))["geometry_pixel_values"].shape[-1] == 518


# ------------------------------------------------------------------------------------------------------- checkpoints


def test_missing_tokenizer_files_are_named(model, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (broken / name).unlink(missing_ok=True)
    assert g2vlm(["chat", "--model", str(broken), "--image", str(VIEWS[0]), "Where?", "--device", "cpu"]) == 2
    error = one_line_error(capsys)
    assert "tokenizer.json" in error and "lacks the tokenizer" in error


@pytest.mark.parametrize("change", [-1, 1])
def test_weights_that_do_not_match_the_config_are_refused(model, tmp_path, capsys, change):
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] += change
    (broken / "config.json").write_text(json.dumps(config))
    assert reconstruct(broken, tmp_path / "scene", "--device", "cpu") == 2
    error = one_line_error(capsys)
    assert ("unexpected weights" if change < 0 else "missing weights") in error and "layers." in error
    assert not (tmp_path / "scene").exists()


def test_help_does_not_import_torch_or_transformers():
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="g2vlm")] == ["g2vlm_hf_launcher:g2vlm"]
    script = (
        "import sys\n"
        "from g2vlm_hf_launcher import g2vlm\n"
        "sys.argv = ['g2vlm', '--help']\n"
        "try:\n"
        "    g2vlm()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(name for name in ('torch', 'transformers', 'g2vlm_hf') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "reconstruct" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def test_the_launcher_runs_the_commands(tmp_path):
    argv = ["chat", "--model", str(tmp_path / "typo-model"), "--image", str(VIEWS[0]), "Where?"]
    result = subprocess.run([sys.executable, "-m", "g2vlm_hf_launcher", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"g2vlm: error: Model folder {tmp_path / 'typo-model'} does not exist."


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("g2vlm-2b", "Model g2vlm-2b is no folder here, and a Hub id has the form owner/name"),
        (
            "outputs/g2vlm-2b",
            "Model folder outputs/g2vlm-2b does not exist (outputs is a folder here, so this is no Hub id)",
        ),
    ],
    ids=["bare-name", "folder-typo"],
)
def test_a_model_name_that_is_neither_a_folder_nor_a_hub_id_is_refused_at_once(
    tmp_path, monkeypatch, capsys, model, message
):
    """A missing local folder written without `./` (a bare name, or `outputs/NAME` beside an `outputs` folder) went
    to the Hub, which offline retries for minutes before failing; now one line at once, in `g2vlm` and `g2vlm-eval`.
    A real folder of that name, or `owner/name` with no such local folder, is still taken as it is."""
    from g2vlm_hf.model_loading import check_model_path, load_checked

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert g2vlm(["chat", "--model", model, "--image", str(VIEWS[0]), "Where?"]) == 2
    assert message in one_line_error(capsys)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "Where?", "images": [str(VIEWS[0])], "answer": "2.5"}))
    assert eval_cli.main(["vqa", "--model", model, "--data", str(questions), "--output", "r.json"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    with pytest.raises(ValueError, match=re.escape(message)):  # the demo's loader
        load_checked(model, "auto", "cpu")
    (tmp_path / model).mkdir(parents=True)
    check_model_path(model)  # it exists now: a local folder
    check_model_path("InternRobotics/G2VLM-2B-MoT")  # no local InternRobotics folder: left to the Hub
