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
from conftest import greedy_answer, write_video  # noqa: E402
from demo_photos import photos  # noqa: E402
from hub_testing import VIEWS, fast_tiny_copy  # noqa: E402  (after the sys.path entry)

from g2vlm_hf.point_filters import percentile_box  # noqa: E402

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


DEFAULT_DISPLAY = (0, 2.0, 0.0, False, False, "all", 200_000, True, "image")  # as the page starts


def cloud_of(path) -> np.ndarray:
    """The vertices of the point cloud in a GLB or PLY file."""
    loaded = trimesh.load(path, force="scene") if str(path).endswith(".glb") else trimesh.load(path)
    if isinstance(loaded, trimesh.PointCloud):
        return np.asarray(loaded.vertices)
    [cloud] = [g for g in loaded.geometry.values() if isinstance(g, trimesh.PointCloud)]
    return np.asarray(cloud.vertices)


def decoded(view: dict, key: str, dtype: str, width: int = 3) -> np.ndarray:
    """An array of a viewer value (`lines`, `cones`, their colours)."""
    return np.frombuffer(base64.b64decode(view[key]), dtype=dtype).reshape(-1, width)


def counts(status: str) -> tuple[int, int, int]:
    """(passing, total, shown) from the status line."""
    passing, total = (
        int(value.replace(",", "")) for value in re.search(r"([\d,]+) of ([\d,]+) points pass", status).groups()
    )
    shown = re.search(r"; ([\d,]+) of them are shown", status)
    return passing, total, passing if shown is None else int(shown.group(1).replace(",", ""))


def test_demo_serves_reconstruction_and_chat(app_module, model_folder, tmp_path):
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_new_tokens=4)
    app = app_module.build_demo(demo)
    app_module.launch(app, demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(
            app.local_url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False
        )
        views = [gradio_client.handle_file(str(view)) for view in VIEWS]

        status, _, _, depth, downloads, *_ = client.predict(views, None, 10, 1, api_name="/reconstruct")
        assert status == f"Reconstructed {len(VIEWS)} views." and downloads is None  # nothing written yet
        assert [item["caption"] for item in depth] == [f"{view.name}: depth" for view in VIEWS]
        assert not list(Path(demo.scratch.path).rglob("*.ply"))  # the exports are written when asked for
        view, status, _ = client.predict(*DEFAULT_DISPLAY, api_name="/redraw")
        viewed = app_module.decode_viewer_points(view)
        passing, total, shown_count = counts(status)
        assert view["count"] == len(viewed) == shown_count == passing > 0
        # one solid cone per camera (4 sides and a 2-triangle base) with its 8 edges, in the camera's colour
        cones, edges = decoded(view, "cones", "<f4"), decoded(view, "lines", "<f4")
        assert len(cones) == 18 * len(VIEWS) and len(edges) == 16 * len(VIEWS)
        palette = app_module.view_colours(len(VIEWS))
        cone_colours = decoded(view, "cone_colours", np.uint8).reshape(len(VIEWS), 18, 3)
        assert (cone_colours.max(axis=1) == palette).all()  # the brightest face is the camera's colour
        # the cones are sized from the cameras and the points' extent: visible, whatever the scene's scale
        depth_of_cone = np.linalg.norm(cones[0] - cones[12:18].mean(axis=0))  # apex to the base's middle
        low, high = percentile_box(viewed, 2.0)
        assert depth_of_cone >= 0.99 * app_module.CONE_MIN * np.linalg.norm(high - low)
        # a new scene is framed on the robust box of its points (and cameras): most points inside
        low, high = (np.array(corner) for corner in view["box"])
        assert (low < high).all() and ((viewed >= low) & (viewed <= high)).all(axis=1).mean() > 0.8
        scene_id = view["scene"]

        # the downloads are written on demand: "shown" = what the view draws (the viewer's frame is turned y-up)
        files = {Path(path).name: path for path in client.predict(*DEFAULT_DISPLAY, api_name="/download_shown")}
        assert set(files) == {"shown_scene.glb", "shown_points.ply"}
        shown = cloud_of(files["shown_points.ply"])
        assert len(shown) == shown_count and np.allclose(cloud_of(files["shown_scene.glb"]), shown)
        assert np.allclose(viewed, shown * [1, -1, -1], atol=1e-5)
        files = {Path(path).name: path for path in client.predict(api_name="/download_full")}
        assert {"full_scene.glb", "full_points.ply", "cameras.json"} <= set(files)
        assert len(cloud_of(files["full_points.ply"])) == total >= len(shown)

        # display options redraw the kept scene without the model: cameras hidden, points coloured by view
        without, status, downloads = client.predict(*DEFAULT_DISPLAY[:7], False, "view", api_name="/redraw")
        assert len(decoded(without, "cones", "<f4")) == len(decoded(without, "lines", "<f4")) == 0
        assert without["scene"] == scene_id  # the same scene: the viewpoint stays
        assert {Path(path).name for path in downloads} == set(files)  # the stale "shown" files are withdrawn
        colours = decoded(without, "colours", np.uint8)
        assert {tuple(colour) for colour in colours} <= {tuple(colour) for colour in palette}
        # points of one view only, at most 1,000: the count says how many pass and how many are shown
        one_view = (0, 2.0, 0.0, False, False, "1", 1_000, True, "image")
        view, status, _ = client.predict(*one_view, api_name="/redraw")
        passing, _, shown_count = counts(status)
        assert view["count"] == shown_count == 1_000 < passing
        assert "1,000 of them are shown" in status
        files = {Path(path).name: path for path in client.predict(*one_view, api_name="/download_shown")}
        assert np.allclose(app_module.decode_viewer_points(view), cloud_of(files["shown_points.ply"]) * [1, -1, -1])
        assert len(decoded(view, "cones", "<f4")) == 18  # the chosen view's camera only

        history, box, used = client.predict(views, QUESTION, [], None, 10, 1, api_name="/ask")
        assert box == ""
        assert [turn["role"] for turn in history] == ["user", "assistant"]
        answer = history[1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        # the app returns the model's answer, computed here without the package's chat code that the app calls
        expected = greedy_answer(demo.model, demo.processor, [str(v) for v in VIEWS], QUESTION, demo.max_new_tokens)
        assert answer == f"{expected}\n\n*Views used: {', '.join(view.name for view in VIEWS)}*"
        assert [item["caption"] for item in used] == [view.name for view in VIEWS]

        # a failed reconstruction says so in the status and keeps the scene; a blank question is a warning only
        status, *_ = client.predict([], None, 10, 1, api_name="/reconstruct")
        assert status == (
            "⚠️ Not reconstructed: Upload images (or a video) of the scene first, or click an example scene. "
            "The previous results are kept."
        )
        assert client.predict(*DEFAULT_DISPLAY, api_name="/redraw")[0]["scene"] == scene_id
        history, _, _ = client.predict(views, "  ", [], None, 10, 1, api_name="/ask")
        assert history == {"__type__": "update"}  # nothing changes (the page shows the warning)
    finally:
        app.close()
        demo.close()
    assert not demo.scratch.path.exists()  # the written scenes do not outlive the demo


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
        assert ".." not in note
        # a reconstruction goes on without the bad file and says what it skipped
        result = demo.reconstruct([str(VIEWS[0]), str(not_an_image), str(VIEWS[1])], None, 10, 1)
        assert result.scene.names == [VIEWS[0].name, VIEWS[1].name]
        _, status = demo.draw(result.scene, app_module.Display())
        assert "Skipped: notes.png is not an image" in status and ".." not in status
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
        result = demo.reconstruct(paths, None, 10, 1)
        assert "Use every 3rd image" in result.status and result.image_step == 3 and result.scene is None
        assert len(demo.read_views(paths, step=3).images) == 2
    finally:
        demo.close()


def test_a_run_the_machine_cannot_hold_is_refused_with_an_estimate(app_module, model_folder, tmp_path):
    """150 textured 640x480 photos at the real width (518) on a 24 GB machine: refused before the model runs, with
    the estimate and the every-k-th that fits; that one fits."""
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", memory_budget_gb=0.8 * 24)
    demo.processor.geometry_image_processor.target_width = 518
    try:
        paths = photos(tmp_path / "many", 10) * 15  # 150 photos (read one by one, as uploads)
        called = []
        demo.model.reconstruct = lambda *args, **kwargs: called.append(1)
        result = demo.reconstruct(paths, None, 10, 1)
        assert called == [] and result.scene is None and result.image_step >= 2
        assert re.search(
            r"150 views would need about \d+\.\d GB and about \d+ s, more than this machine has free", result.status
        )
        gigabytes = float(re.search(r"about (\d+\.\d) GB", result.status).group(1))
        assert gigabytes > 19.2  # the measurement: 10 views +0.5 GB, 30 views +3.1 GB, ~quadratic
        gallery, note = demo.preview(paths, None, 10, result.image_step)
        assert re.search(rf"\*\*{len(paths[:: result.image_step])} images\*\* will be reconstructed", note)
        assert "GB" in note and len(gallery) == len(paths[:: result.image_step])
    finally:
        demo.close()


def test_cancel_stops_the_model_between_layers(app_module, model_folder):
    """A cancelled run stops at the next layer (the page's Cancel and a closed page set the session's flag)."""
    import torch

    demo = app_module.G2VLMDemo(str(model_folder), device="cpu")
    request = types.SimpleNamespace(session_hash="page-1")
    layers = [m for m in demo.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    first, last = layers[-1][0], layers[-1][-1]
    ran_last = []
    first.register_forward_pre_hook(lambda *args: demo.cancel(request))  # "Cancel" pressed during the run
    last.register_forward_hook(lambda *args: ran_last.append(1))
    try:
        result = demo.reconstruct([str(view) for view in VIEWS], None, 10, 1, request)
        assert result.scene is None and result.status.startswith("Cancelled") and ran_last == []
        demo.cancel(types.SimpleNamespace(session_hash="other"))  # another page's cancel: nothing to stop
    finally:
        demo.close()


def test_scratch_stays_under_its_cap_over_ten_runs(app_module, model_folder):
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", scratch_cap_mb=3.0)
    try:
        sizes = []
        for _ in range(10):
            scene = demo.reconstruct([str(view) for view in VIEWS], None, 10, 1).scene
            demo.full_downloads(scene)
            demo.shown_downloads(scene, *DEFAULT_DISPLAY)
            demo.shown_downloads(scene, *DEFAULT_DISPLAY[:6], 5_000, True, "view")  # a redraw's files replace
            sizes.append(demo.scratch.size())
            assert (scene.folder / "full" / "full_points.ply").is_file()  # the newest scene is always kept
        assert max(sizes) <= 3e6 and len(list(demo.scratch.path.iterdir())) < 10
        demo.forget(scene)  # its session ended
        assert not scene.folder.exists()
    finally:
        demo.close()


def test_mixed_sizes_are_resized_to_the_first_view(app_module, model_folder, tmp_path):
    paths = photos(tmp_path / "a", 2) + photos(tmp_path / "b", 1, size=(800, 450))
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu")
    try:
        _, note = demo.preview(paths, None, 10, 1)
        assert "1 view of another size resized to the first view's 640x480" in note
        result = demo.reconstruct(paths, None, 10, 1)
        assert result.scene.arrays.world_points.shape[0] == 3
        assert "resized to the first view's 640x480" in demo.draw(result.scene, app_module.Display())[1]
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
    arrays = app_module.SceneArrays(
        camera_poses=np.eye(4)[None].repeat(2, 0), world_points=points, images=np.zeros((views, height, width, 3),
        dtype=np.uint8), depth=np.ones((views, height, width)),
    )  # fmt: skip
    scene = app_module.Scene(folder=Path("."), views=[], names=["a.png", "b.png"], arrays=arrays)
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
        expected = greedy_answer(demo.model, demo.processor, [str(v) for v in VIEWS[:2]], QUESTION, demo.max_new_tokens)
        assert expected and demo.answer([str(view) for view in VIEWS[:2]], QUESTION) == expected
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
        result = demo.reconstruct(None, str(video), 3, 1)
        assert result.scene.names == names and result.scene.arrays.depth.shape[0] == 3
        assert len(result.depth_previews) == 3
        with pytest.raises(ValueError, match="a reconstruction needs at least 2: use a smaller frame interval"):
            demo.read_views(None, str(video), every=7)
    finally:
        demo.close()


def test_example_scenes_are_bundled(app_module):
    scenes = app_module.example_scenes()
    assert len(scenes) >= 2
    for label, paths in scenes:
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
        scene = demo.reconstruct([str(view) for view in VIEWS], None, 10, 1).scene
        total = scene.arrays.world_points[..., 0].size
        kept = {}
        for percentile in (0, 50, 90):  # outliers off, to count the confidence filter alone
            view, _ = demo.draw(scene, app_module.Display(confidence=percentile, outliers=0))
            kept[percentile] = len(app_module.decode_viewer_points(view))
        assert kept[0] == total
        assert abs(kept[50] - total / 2) <= 0.01 * total and abs(kept[90] - total / 10) <= 0.01 * total
        # a NaN confidence (a diverged pixel) drops that point only, not every point (the percentile stays finite)
        scene.arrays.confidence[0, 0, 0] = np.nan
        view, status = demo.draw(scene, app_module.Display(confidence=50, outliers=0))
        assert abs(len(app_module.decode_viewer_points(view)) - total / 2) <= 0.01 * total
        assert counts(status)[1] == total
    finally:
        plain.close()
        demo.close()
