"""Issue 30 (point 5): every bad input of the command lines ends as one line on stderr before any model work, the
inputs layer reads videos upright (display rotation) and refuses too few frames on every path, and each flag the
README calls "checked early" is checked before the model is loaded (the loader is replaced by one that fails)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR, write_video
from PIL import Image

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.evaluation import cli as eval_cli
from g2vlm_hf.evaluation import write_scene
from g2vlm_hf.inputs import InputError, iter_video_frames, open_views, video_frames

av = pytest.importorskip("av", reason="the video extra (PyAV) is part of the test extras")

VIEWS = [FIXTURE_DIR / "images" / f"view_{index}.png" for index in range(2)]


def one_line_error(capsys, program: str = "g2vlm") -> str:
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith(f"{program}: error:"), err
    return errors[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """The model loader fails the test: what is checked early never gets to it."""

    def loaded(*args, **kwargs):
        pytest.fail("the model was loaded")

    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", loaded)


def gradient_frames(count: int, size=(64, 32)) -> list[Image.Image]:
    """Frames whose left half is dark and right half bright (orientation is visible), slightly different each."""
    width, height = size
    frames = []
    for index in range(count):
        array = np.zeros((height, width, 3), np.uint8)
        array[:, width // 2 :] = 230
        array[: height // 4] += np.uint8(index % 20)  # top rows mark "up"
        frames.append(Image.fromarray(array))
    return frames


def write_rotated_video(path, frames, degrees: int):
    """Like conftest's `write_video`, with a display matrix that rotates the frames `degrees` counter-clockwise (as a
    phone filming upright writes it)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.set_display_rotation(degrees)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path):
    """An .mp4 holding one second of a tone and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------- videos, upright


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_video_frames_are_turned_by_the_display_rotation(tmp_path, degrees):
    frames = gradient_frames(3)
    video = write_rotated_video(tmp_path / "phone.mp4", frames, degrees)
    read = list(iter_video_frames(video))
    turned = frames[0].rotate(degrees, expand=True)  # PIL turns counter-clockwise, as the display matrix says
    assert read[0].size == turned.size
    assert np.abs(np.asarray(read[0], float) - np.asarray(turned, float)).mean() < 6  # MPEG-4 noise only
    assert video_frames(video, every=1)[0].size == turned.size  # the list the demo reads, same decoding


def top_minus_bottom(image: torch.Tensor) -> torch.Tensor:
    """Mean brightness of the top half minus the bottom half of `(..., C, H, W)` images (any monotonic scaling)."""
    top, bottom = image.chunk(2, dim=-2)
    return top.mean(dim=(-3, -2, -1)) - bottom.mean(dim=(-3, -2, -1))


def test_a_rotated_video_is_reconstructed_upright_on_both_paths(converted_tiny, tmp_path, monkeypatch):
    """The views the model is given are the frames turned as a player shows them (PIL's counter-clockwise rotation by
    the display matrix's angle): the bright right half of each stored frame is on top, on both paths."""
    import g2vlm_hf.model_loading

    frames = gradient_frames(4, size=(112, 56))
    video = write_rotated_video(tmp_path / "phone.mp4", frames, 90)
    displayed = torch.from_numpy(np.asarray(frames[0].rotate(90, expand=True), np.float64)).movedim(-1, 0)
    assert top_minus_bottom(displayed) > 100  # the bright half is up once turned
    real_load, given = g2vlm_hf.model_loading.load_model, []

    def load_recording(*args, **kwargs):
        model = real_load(*args, **kwargs)
        reconstruct = model.reconstruct

        def recording(**inputs):
            given.append(inputs["geometry_pixel_values"].cpu())
            return reconstruct(**inputs)

        model.reconstruct = recording
        return model

    monkeypatch.setattr(g2vlm_hf.model_loading, "load_model", load_recording)
    for extra, name in (([], "one"), (["--chunk-size", "2", "--overlap", "1"], "chunks")):
        output = tmp_path / name
        given.clear()
        argv = ["reconstruct", "--model", str(converted_tiny), "--video", str(video), "--every", "1",
                "--output", str(output), "--device", "cpu", *extra]  # fmt: skip
        assert g2vlm(argv) == 0
        views = torch.cat([pixels[0] for pixels in given])  # (views, 3, H, W), the processor's normalised pixels
        assert len(views) == (4 if name == "one" else 6)  # chunks of 2 sharing 1: 3 passes
        assert views.shape[-2] > views.shape[-1]  # portrait
        assert bool((top_minus_bottom(views) > 0.5).all()), top_minus_bottom(views)  # bright half up, every view
        cameras = json.loads((output / "cameras.json").read_text())["cameras"]
        assert [camera["original"]["height"] for camera in cameras] == [112] * 4  # portrait, as displayed
        assert [camera["original"]["width"] for camera in cameras] == [56] * 4


# ------------------------------------------------------------------------------------- too few frames, every path


def one_frame_cases(tmp_path) -> dict:
    write_video(tmp_path / "one.mp4", gradient_frames(1))
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "still.png")
    (tmp_path / "still.png").rename(tmp_path / "still.mp4")
    write_video(tmp_path / "three.mp4", gradient_frames(3))
    return {
        "one.mp4": (tmp_path / "one.mp4", "1", "single frame"),
        "png": (tmp_path / "still.mp4", "1", "single frame"),
        "every": (tmp_path / "three.mp4", "5", "keeps 1 of the 3 frames"),
    }


@pytest.mark.parametrize("case", ["one.mp4", "png", "every"])
@pytest.mark.parametrize("chunked", [False, True])
def test_one_kept_frame_is_refused_on_both_paths(converted_tiny, tmp_path, capsys, no_model_load, case, chunked):
    video, every, message = one_frame_cases(tmp_path)[case]
    argv = ["reconstruct", "--model", str(converted_tiny), "--video", str(video), "--every", every,
            "--output", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    assert g2vlm(argv + (["--chunk-size", "4", "--overlap", "1"] if chunked else [])) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("chunked", [False, True])
def test_an_audio_only_video_is_one_line(converted_tiny, tmp_path, capsys, no_model_load, chunked):
    video = write_audio_only(tmp_path / "talk.mp4")
    argv = ["reconstruct", "--model", str(converted_tiny), "--video", str(video), "--output", str(tmp_path / "out"),
            "--device", "cpu", *(["--chunk-size", "4", "--overlap", "1"] if chunked else [])]  # fmt: skip
    assert g2vlm(argv) == 2
    assert "has no video stream" in one_line_error(capsys)
    with pytest.raises(InputError, match="no video stream"):
        open_views(video=video)


def test_chat_on_an_audio_only_video_is_one_line(converted_tiny, tmp_path, capsys, no_model_load):
    video = write_audio_only(tmp_path / "talk.mp4")
    assert g2vlm(["chat", "--model", str(converted_tiny), "--video", str(video), "--device", "cpu", "What?"]) == 2
    assert "has no video stream" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------- devices, every command


def unavailable_devices() -> list[str]:
    devices = ["bogus", "cuda:banana"]
    if not torch.backends.mps.is_available():
        devices.append("mps")
    if not torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", unavailable_devices())
def test_an_unusable_device_is_one_line_in_every_command(converted_tiny, tmp_path, capsys, no_model_load, device):
    argv = ["reconstruct", "--model", str(converted_tiny), *map(str, VIEWS), "--output", str(tmp_path / "o")]
    assert g2vlm([*argv, "--device", device]) == 2
    assert f"--device {device}" in one_line_error(capsys)
    assert g2vlm(["chat", "--model", str(converted_tiny), "--image", str(VIEWS[0]), "--device", device, "Hi?"]) == 2
    assert f"--device {device}" in one_line_error(capsys)
    write_scene(tmp_path / "data" / "room", np.zeros((2, 28, 28, 3), np.uint8), depth=np.ones((2, 28, 28)))
    argv = ["depth", "--model", str(converted_tiny), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "r")]
    assert eval_cli.main([*argv, "--device", device]) == 2
    assert f"--device {device}" in one_line_error(capsys, "g2vlm-eval")


# ----------------------------------------------------------------------------- flags checked before the model loads


def reconstruct_argv(model, tmp_path, *extra) -> list[str]:
    return ["reconstruct", "--model", str(model), *map(str, VIEWS), "--output", str(tmp_path / "out"), "--device",
            "cpu", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--chunk-size", "4", "--overlap", "1", "--ask", "Where?", "--ask-views", "257"], "--ask-views 257"),
        (["--ask", "Where?", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--chunk-size", "257", "--overlap", "8"], "--chunk-size 257"),
        (["--device", "bogus"], "--device bogus"),
        (["--colmap", "{out}/depth"], "collides with the scene's own depth"),
        (["--colmap", "{occupied}"], "{occupied}"),
        (["--chunk-size", "4", "--overlap", "4"], "--overlap must be at least 1 and less than --chunk-size 4"),
        (["--chunk-size", "1"], "--chunk-size must be at least 2"),
        (["--every", "0"], "--every must be at least 1"),
        (["--max-views", "0"], "--max-views must be at least 1"),
        (["--ask", " "], "--ask needs a question"),
        (["--max-points", "0"], "--max-points must be at least 1"),
        (["--confidence-percentile", "100"], "--confidence-percentile must be in [0, 100)"),
        (["--output", "{occupied}"], "{occupied}"),
        (["--overlap", "4"], "--overlap works on a chunked reconstruction"),
        (["--ask", "Where?", "--ask-views", "4"], "--ask-views works on a chunked reconstruction"),
        (["--ask", "Where?", "--ask-views-by", "uniform"], "--ask-views-by works on a chunked reconstruction"),
        (["--chunk-size", "4", "--ask-views", "4"], "--ask-views chooses the views --ask asks about"),
    ],
    ids=[
        "ask-views",
        "max-new-tokens",
        "chunk-size-over",
        "device",
        "colmap-inside",
        "colmap-occupied",
        "overlap",
        "chunk-size-under",
        "every",
        "max-views",
        "ask",
        "max-points",
        "confidence-percentile",
        "output-occupied",
        "overlap-without-chunks",
        "ask-views-without-chunks",
        "ask-views-by-without-chunks",
        "ask-views-without-ask",
    ],
)
def test_flags_are_checked_before_the_model_loads(converted_tiny, tmp_path, capsys, no_model_load, extra, message):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    names = {"out": tmp_path / "out", "occupied": occupied}
    extra = [value.format(**names) for value in extra]
    argv = reconstruct_argv(converted_tiny, tmp_path)
    if "--output" in extra:  # the flag given twice: argparse keeps the last
        argv = argv[: argv.index("--output")] + argv[argv.index("--output") + 2 :]
    assert g2vlm([*argv, *extra]) == 2
    assert message.format(**names) in one_line_error(capsys)
    assert not (tmp_path / "out").exists() and (occupied / "notes.txt").read_text() == "mine"


def test_too_many_views_for_one_pass_are_refused_before_decoding(converted_tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("g2vlm_hf.inputs.video.upright", lambda frame: pytest.fail("a frame was decoded"))
    write_video(tmp_path / "long.mp4", gradient_frames(300, size=(16, 16)))
    argv = ["reconstruct", "--model", str(converted_tiny), "--video", str(tmp_path / "long.mp4"), "--every", "1",
            "--output", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    assert g2vlm(argv) == 2
    assert "300 views (frames of" in (error := one_line_error(capsys)) and "--chunk-size" in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", str(VIEWS[0]), "--max-new-tokens", "0", "Where?"], "--max-new-tokens must be at least 1"),
        (["--video", "{video}", "--views", "0", "Where?"], "--views must be at least 1"),
        (["--image", str(VIEWS[0]), " "], "The question is empty"),
        (["--image", str(VIEWS[0]), "--video", "{video}", "Where?"], "exactly one"),
        (["--image", str(VIEWS[0]), "--device", "bogus", "Where?"], "--device bogus"),
        (["--video", "{video}", "--views", "257", "Where?"], "257 views (frames of"),
        (["--image", str(VIEWS[0]), "--views", "4", "Where?"], "--views picks frames of a --video"),
    ],
    ids=["max-new-tokens", "views", "question", "image-and-video", "device", "views-over-max", "views-of-images"],
)
def test_chat_flags_are_checked_before_the_model_loads(
    converted_tiny, tmp_path, capsys, monkeypatch, no_model_load, extra, message
):
    video = write_video(tmp_path / "walk.mp4", gradient_frames(300, size=(16, 16)))
    monkeypatch.setattr("g2vlm_hf.inputs.video.upright", lambda frame: pytest.fail("a frame was decoded"))
    argv = ["chat", "--model", str(converted_tiny), "--device", "cpu", *(v.format(video=video) for v in extra)]
    assert g2vlm(argv) == 2
    assert message in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------------- evaluation


def eval_argv(task: str, data, output) -> list[str]:
    return [task, "--model", "./never-loaded", "--data", str(data), "--output", str(output), "--device", "cpu"]


@pytest.fixture
def no_eval_model(monkeypatch):
    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_eval_refuses_string_ground_truth(tmp_path, capsys, no_eval_model):
    scene = tmp_path / "data" / "room"
    write_scene(scene, np.zeros((2, 28, 28, 3), np.uint8))
    np.savez(scene / "gt.npz", depth=np.full((2, 28, 28), "1.5"))
    assert eval_cli.main(eval_argv("depth", tmp_path / "data", tmp_path / "r.json")) == 2
    error = one_line_error(capsys, "g2vlm-eval")
    assert "'depth' holds <U3 values" in error and "gt.npz" in error
    assert not (tmp_path / "r.json").exists()


def test_eval_refuses_nan_poses_naming_the_scene(tmp_path, capsys, no_eval_model):
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[1, 0, 3] = np.nan
    write_scene(tmp_path / "data" / "kitchen", np.zeros((3, 28, 28, 3), np.uint8), poses=poses)
    write_scene(tmp_path / "data" / "hall", np.zeros((3, 28, 28, 3), np.uint8), poses=np.tile(np.eye(4), (3, 1, 1)))
    assert eval_cli.main(eval_argv("poses", tmp_path / "data", tmp_path / "r.json")) == 2
    error = one_line_error(capsys, "g2vlm-eval")
    assert "Scene kitchen" in error and "NaN" in error and "view(s) 1" in error
    assert not (tmp_path / "r.json").exists()


def test_eval_reads_every_image_suffix_of_the_inputs_layer(tmp_path):
    from g2vlm_hf.evaluation.datasets import find_scenes

    scene = tmp_path / "data" / "scan"
    (scene / "images").mkdir(parents=True)
    for index, suffix in enumerate((".tif", ".gif")):
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(scene / "images" / f"{index}{suffix}")
    np.savez(scene / "gt.npz", depth=np.ones((2, 28, 28)))
    assert [path.suffix for path in find_scenes(tmp_path / "data", "depth")[0].image_paths] == [".tif", ".gif"]


# ------------------------------------------------------------------------------------------------- the inputs layer


def test_photos_in_formats_not_read_are_named_not_silently_left_out(tmp_path):
    """A folder of iPhone photos (HEIC) beside a few JPEGs: the HEIC files are named in a warning with what to do (the
    scene was silently smaller); a folder of HEIC files alone is refused naming them. Other files stay unmentioned."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    folder = tmp_path / "iphone"
    folder.mkdir()
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "IMG_0003.DNG", "IMG_0004.HEIC", "notes.txt", ".DS_Store"):
        (folder / name).write_bytes(b"not read")
    with pytest.raises(InputError, match=r"holds no image files .*; 4 photo\(s\) in a format that is not read "
                       r"\(IMG_0001.HEIC, IMG_0002.heic, IMG_0003.DNG, \.\.\.\): convert them to JPEG or PNG"):  # fmt: skip
        open_views(folder=folder)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(folder / "IMG_0005.jpg")
    with CaptureLogger(logging.get_logger("g2vlm_hf.inputs.images")) as captured:
        views = open_views(folder=folder)
    assert views.names == ["IMG_0005.jpg"]
    assert "1 image files are used and 4 photo(s) in a format that is not read" in captured.out
    assert "notes.txt" not in captured.out and "DS_Store" not in captured.out


def test_views_are_counted_and_named_before_any_decoding(tmp_path, monkeypatch):
    write_video(tmp_path / "walk.mp4", gradient_frames(5))
    folder = tmp_path / "views"
    folder.mkdir()
    for name in ("b.tif", "a.gif", "c.PNG", "notes.txt"):
        (folder / name).write_bytes(b"")
    monkeypatch.setattr("g2vlm_hf.inputs.video.upright", lambda frame: pytest.fail("a frame was decoded"))
    monkeypatch.setattr("g2vlm_hf.processing.image_io.load_image", lambda path: pytest.fail("an image was read"))
    video = open_views(video=tmp_path / "walk.mp4", every=2)
    assert (len(video), video.names) == (3, ["walk.mp4#frame0", "walk.mp4#frame2", "walk.mp4#frame4"])
    assert open_views(folder=folder).names == ["a.gif", "b.tif", "c.PNG"]  # one suffix list, any case
    with pytest.raises(
        InputError, match=r"is a folder, not an image file \(`g2vlm reconstruct --folder` takes a folder of views\)"
    ):
        open_views(images=[folder])
    with pytest.raises(InputError, match="exactly one of them"):
        open_views(images=[folder / "a.gif"], folder=folder)
