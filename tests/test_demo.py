"""The Gradio demo (`demo/app.py`), started headless on 127.0.0.1 and driven through its API with gradio_client.

Skipped when gradio is not installed (it is the optional extra `demo`: `pip install -e ".[demo]"`; the test extra
does not pull it in). Offline: the model is a local converted folder, and gradio's analytics are turned off.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls
gradio = pytest.importorskip("gradio", reason='the demo needs gradio: pip install -e ".[demo]"')
gradio_client = pytest.importorskip(
    "gradio_client", reason='the demo test needs gradio_client: pip install -e ".[demo]"'
)
trimesh = pytest.importorskip("trimesh")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_video  # noqa: E402
from hub_testing import VIEWS, fast_tiny_copy  # noqa: E402  (after the sys.path entry)

APP = Path(__file__).resolve().parents[1] / "demo" / "app.py"
QUESTION = "How far is the red box from the blue wall?"


def load_app_module():
    spec = importlib.util.spec_from_file_location("g2vlm_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_older_gradio_is_named_with_the_install_command(monkeypatch):
    """The 3D view needs gr.HTML features of recent gradio: an older one is refused at import, with the fix."""
    monkeypatch.setattr(gradio, "__version__", "6.9.0")
    with pytest.raises(ImportError, match=r"needs gradio>=6\.31, found 6\.9\.0: pip install -U 'gradio>=6\.31'"):
        load_app_module()


@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


@pytest.fixture(scope="module")
def model_folder(converted_tiny, tmp_path_factory):
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("demo") / "model")


DEFAULT_DISPLAY = (0, 2.0, 0.0, False, False, "all", 200_000)  # confidence .. max points; then cameras, colouring


def cloud_of(path) -> np.ndarray:
    """The vertices of the point cloud in a GLB or PLY file."""
    loaded = trimesh.load(path, force="scene") if str(path).endswith(".glb") else trimesh.load(path)
    if isinstance(loaded, trimesh.PointCloud):
        return np.asarray(loaded.vertices)
    [cloud] = [g for g in loaded.geometry.values() if isinstance(g, trimesh.PointCloud)]
    return np.asarray(cloud.vertices)


def lines_of(view: dict) -> np.ndarray:
    """The camera frustums' line-segment ends in a viewer value."""
    return np.frombuffer(base64.b64decode(view["lines"]), dtype="<f4").reshape(-1, 3)


def shown_count(status: str) -> int:
    return int(re.search(r"Showing ([\d,]+) of", status).group(1).replace(",", ""))


def test_demo_serves_reconstruction_and_chat(app_module, model_folder, tmp_path):
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_new_tokens=4)
    app = app_module.build_demo(demo)
    app_module.launch(app, demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(
            app.local_url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False
        )
        views = [gradio_client.handle_file(str(view)) for view in VIEWS]

        view, depth, downloads, status, *_ = client.predict(
            views, None, 10, 1, *DEFAULT_DISPLAY, True, "image", api_name="/reconstruct"
        )
        viewed = app_module.decode_viewer_points(view)
        assert view["count"] == len(viewed) == shown_count(status) > 0
        lines = lines_of(view)
        assert len(lines) == 16 * len(VIEWS)  # 8 edges per camera frustum
        # the frustums are sized from the shown points' extent: visible, whatever the scene's scale
        frustum = np.ptp(lines[:16], axis=0)
        assert np.linalg.norm(frustum) > 0.03 * np.linalg.norm(np.ptp(viewed, axis=0))
        # a new scene is framed on the robust box of its points: most points inside, far outliers outside
        low, high = (np.array(corner) for corner in view["box"])
        assert (low < high).all() and ((viewed >= low) & (viewed <= high)).all(axis=1).mean() > 0.8
        scene_id = view["scene"]
        assert [item["caption"] for item in depth] == [f"{view.name}: depth" for view in VIEWS]
        files = {Path(path).name: path for path in downloads}
        assert {"shown_scene.glb", "shown_points.ply", "full_scene.glb", "full_points.ply", "cameras.json"} <= set(
            files
        )
        assert ("full_colmap.zip" in files) != ("No COLMAP model" in status)  # a zip, or the reason why not
        assert status.startswith(f"Reconstructed {len(VIEWS)} views")
        # the shown downloads are what the view draws: the same points (the viewer's turned y-up), and the full
        # ones hold every point
        shown = cloud_of(files["shown_points.ply"])
        assert len(shown) == shown_count(status) and np.allclose(cloud_of(files["shown_scene.glb"]), shown)
        assert np.allclose(viewed, shown * [1, -1, -1], atol=1e-5)
        total = int(re.search(r"of ([\d,]+) points", status).group(1).replace(",", ""))
        assert len(cloud_of(files["full_points.ply"])) == total >= len(shown)

        # display options redraw the kept scene without the model: cameras hidden, points coloured by view
        without, downloads, status = client.predict(*DEFAULT_DISPLAY, False, "view", api_name="/redraw")
        assert len(lines_of(without)) == 0 and without["scene"] == scene_id  # same scene: the viewpoint stays
        palette = {tuple(colour) for colour in app_module.view_colours(len(VIEWS))}
        colours = np.frombuffer(base64.b64decode(without["colours"]), dtype=np.uint8).reshape(-1, 3)
        assert {tuple(colour) for colour in colours} <= palette
        # points of one view only, at most 500: the downloads follow
        view, downloads, status = client.predict(
            0, 2.0, 0.0, False, False, "1", 1_000, True, "image", api_name="/redraw"
        )
        files = {Path(path).name: path for path in downloads}
        shown = cloud_of(files["shown_points.ply"])
        assert view["count"] == len(shown) == shown_count(status) == 1_000
        assert np.allclose(app_module.decode_viewer_points(view), shown * [1, -1, -1], atol=1e-5)
        assert len(lines_of(view)) == 16  # the chosen view's camera only

        history, box, used = client.predict(views, QUESTION, [], None, 10, 1, api_name="/ask")
        assert box == ""
        assert [turn["role"] for turn in history] == ["user", "assistant"]
        answer = history[1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        expected = demo.answer([str(view) for view in VIEWS], QUESTION)  # the app returns the model's answer
        assert answer == f"{expected}\n\n*Views used: {', '.join(view.name for view in VIEWS)}*"
        assert [item["caption"] for item in used] == [view.name for view in VIEWS]

        # readable problems, not a bare "Error"; a failed reconstruction says so in the status
        *_, status, _, _, _, _ = client.predict(
            [], None, 10, 1, *DEFAULT_DISPLAY, True, "image", api_name="/reconstruct"
        )
        assert "Not reconstructed: Upload images" in status and "previous results are kept" in status
        with pytest.raises(gradio_client.exceptions.AppError, match="Type a question"):
            client.predict(views, "  ", [], None, 10, 1, api_name="/ask")
    finally:
        app.close()
        demo.close()
    assert not Path(demo.scratch.name).exists()  # the written scenes do not outlive the demo


def test_bad_and_too_large_files_are_skipped_by_name(app_module, model_folder, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text")
    large = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(large)
    demo = app_module.G2VLMDemo(
        str(model_folder), device="cpu", max_file_mb=0.5
    )  # large.png is ~1.5 MB, the views 0.4 MB
    try:
        views = demo.read_views([str(VIEWS[0]), str(not_an_image), str(large), str(VIEWS[1])])
        assert views.names == [VIEWS[0].name, VIEWS[1].name] and len(views.images) == 2
        assert len(views.skipped) == 2 and "notes.png is not an image" in views.skipped[0]
        assert re.match(r"large\.png is 1\.\d MB; files up to 0\.5 MB are accepted", views.skipped[1])
        assert str(tmp_path) not in " ".join(views.skipped)  # no server folders in what the page shows
        gallery, note = demo.preview([str(VIEWS[0]), str(not_an_image)], None, 10, 1)
        assert len(gallery) == 1 and "**1 images**" in note and "Skipped: notes.png is not an image" in note
        # a reconstruction goes on without the bad file and says what it skipped
        *_, scene, status, _, _, _, _ = demo.reconstruct([str(VIEWS[0]), str(not_an_image), str(VIEWS[1])], None, 10, 1)
        assert scene.names == [VIEWS[0].name, VIEWS[1].name] and "Skipped: notes.png is not an image" in status
        with pytest.raises(ValueError, match=r"None of the 1 files can be used: notes\.png is not"):
            demo.read_views([str(not_an_image)])
        with pytest.raises(ValueError, match="not both"):
            demo.read_views([str(VIEWS[0])], str(large))
    finally:
        demo.close()


def test_too_many_views_suggest_every_kth_image(app_module, model_folder):
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu")
    demo.processor.geometry_image_processor.max_views = 2
    try:
        paths = [str(view) for view in VIEWS] * 2  # 6 views, 2 allowed
        with pytest.raises(app_module.TooManyViews) as raised:
            demo.read_views(paths)
        assert raised.value.step == 3 and "at most 2" in str(raised.value)
        *_, status, _, _, step, _ = demo.reconstruct(paths, None, 10, 1)
        assert "Use every 3rd image" in status and step["value"] == 3
        assert len(demo.read_views(paths, step=3).images) == 2
    finally:
        demo.close()


def test_upload_size_limit_refuses_large_uploads(app_module, model_folder, tmp_path):
    import httpx

    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_file_mb=0.01)
    app = app_module.build_demo(demo)
    app_module.launch(app, demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        url = app.local_url.rstrip("/") + "/gradio_api/upload"
        small = httpx.post(url, files={"files": ("small.bin", b"x" * 5_000)})
        large = httpx.post(url, files={"files": ("large.bin", b"x" * 50_000)})
        assert small.status_code == 200
        assert large.status_code == 413, large.text
    finally:
        app.close()
        demo.close()


def test_sigterm_removes_the_scratch_folder(model_folder, tmp_path):
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch_root), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    process = subprocess.Popen(
        [sys.executable, str(APP), "--model", str(model_folder), "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.5)
        assert list(scratch_root.glob("g2vlm-demo-*"))
        process.terminate()  # SIGTERM, as docker stop or a Space restart sends
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not list(scratch_root.glob("g2vlm-demo-*"))


def test_measuring_two_clicked_pixels(app_module):
    # a scene whose point at (view v, row y, column x) is (x, y, v): distances are known by construction
    views, height, width = 2, 5, 8
    v, y, x = np.meshgrid(np.arange(views), np.arange(height), np.arange(width), indexing="ij")
    points = np.stack([x, y, v], axis=-1).astype(np.float32)
    scene = app_module.Scene(
        folder=Path("."), views=[], names=["a.png", "b.png"], camera_poses=np.eye(4)[None].repeat(2, 0),
        world_points=points, depth=np.ones((views, height, width)), confidence=None,
        intrinsics=np.eye(3)[None].repeat(2, 0), images=np.zeros((views, height, width, 3), dtype=np.uint8),
    )  # fmt: skip
    demo = object.__new__(app_module.G2VLMDemo)
    zoom = 64  # the 8-pixel-wide views are shown 512 pixels wide: a click lands on pixel (index // zoom)
    event = types.SimpleNamespace(index=[1 * zoom + 5, 2 * zoom + 63])
    image, picks, text = demo.measure(scene, "0", [], event)
    assert picks == [(0, 1, 2)] and "Click a second point" in text and image.shape == (height * zoom, width * zoom, 3)
    event.index = [4 * zoom, 4 * zoom]
    image, picks, text = demo.measure(scene, "1", picks, event)
    assert picks == [(0, 1, 2), (1, 4, 4)] and "distance 3.742 scene units" in text  # sqrt(9 + 4 + 1)
    event.index = [0, 0]
    _, picks, _ = demo.measure(scene, "1", picks, event)  # a third click starts a new measurement
    assert picks == [(1, 0, 0)]


def test_chat_answer_is_streamed(app_module, model_folder):
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_new_tokens=6)
    try:
        steps = list(demo.ask(None, [str(view) for view in VIEWS[:2]], QUESTION, [], None, 10, 1))
        history = steps[-1][0]
        assert len(steps) >= 3  # the growing answer, then the final one with the views it used
        partial = [step[0][-1]["content"] for step in steps[:-1]]
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(partial))
        expected = demo.answer([str(view) for view in VIEWS[:2]], QUESTION)
        assert history[-1]["content"] == f"{expected}\n\n*Views used: view_0.png, view_1.png*"
    finally:
        demo.close()


def test_demo_reads_a_video_with_a_frame_interval(app_module, model_folder, tmp_path):
    frames = [Image.fromarray(np.full((84, 112, 3), 30 * index, dtype=np.uint8)) for index in range(7)]
    video = write_video(tmp_path / "walk.mp4", frames)
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_new_tokens=2)
    try:
        views = demo.read_views(None, str(video), every=3)
        names = views.names
        assert names == ["frame 0", "frame 3", "frame 6"] and len(views.images) == 3
        gallery, note = demo.preview(None, str(video), 3, 1)  # the frames are previewed, with their count
        assert [caption for _, caption in gallery] == names and "**3 frames**" in note
        _, depth, _, scene, *_ = demo.reconstruct(None, str(video), 3, 1)
        assert scene.names == names and scene.depth.shape[0] == 3 and len(depth) == 3
    finally:
        demo.close()


def test_example_scenes_are_bundled(app_module):
    examples, labels = app_module.example_scenes()
    assert len(examples) == len(labels) >= 2
    for (paths,), label in zip(examples, labels):
        assert len(paths) >= 2 and all(Path(path).is_file() for path in paths)
        assert f"({len(paths)} views)" in label


def test_confidence_slider_filters_points_when_the_checkpoint_has_confidence(app_module, model_folder, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    # the fixture has no confidence head (the slider is hidden there); add one, random: enough to rank the points
    folder = tmp_path / "with-confidence"
    model = AutoModelForImageTextToText.from_pretrained(model_folder, use_confidence_head=True, dtype=torch.float32)
    model.save_pretrained(folder)
    for path in model_folder.iterdir():
        if not (folder / path.name).exists():
            shutil.copy(path, folder / path.name)

    plain = app_module.G2VLMDemo(str(model_folder), device="cpu")
    demo = app_module.G2VLMDemo(str(folder), device="cpu")
    try:
        assert not plain.has_confidence and demo.has_confidence
        slider = next(
            block
            for block in app_module.build_demo(demo).blocks.values()
            if isinstance(block, gradio.Slider) and "confident" in (block.label or "")
        )
        assert slider.visible and slider.value == 10
        _, _, _, scene, *_ = demo.reconstruct([str(view) for view in VIEWS], None, 10, 1)
        total = scene.world_points[..., 0].size
        counts = {}
        for percentile in (0, 50, 90):  # outliers off, to count the confidence filter alone
            view, _, _ = demo.draw(scene, app_module.Display(confidence=percentile, outliers=0))
            counts[percentile] = len(app_module.decode_viewer_points(view))
        assert counts[0] == total
        assert abs(counts[50] - total / 2) <= 0.01 * total and abs(counts[90] - total / 10) <= 0.01 * total
    finally:
        plain.close()
        demo.close()
