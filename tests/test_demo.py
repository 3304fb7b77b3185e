"""The Gradio demo (`demo/app.py`), started headless on 127.0.0.1 and driven through its API with gradio_client.

Skipped when gradio is not installed (it is the optional extra `demo`: `pip install -e ".[demo]"`; the test extra
does not pull it in). Offline: the model is a local converted folder, and gradio's analytics are turned off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls
gradio = pytest.importorskip("gradio", reason='the demo needs gradio: pip install -e ".[demo]"')
gradio_client = pytest.importorskip(
    "gradio_client", reason='the demo test needs gradio_client: pip install -e ".[demo]"'
)
trimesh = pytest.importorskip("trimesh")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import VIEWS, fast_tiny_copy  # noqa: E402  (after the sys.path entry)

APP = Path(__file__).resolve().parents[1] / "demo" / "app.py"
QUESTION = "How far is the red box from the blue wall?"


def load_app_module():
    spec = importlib.util.spec_from_file_location("g2vlm_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


@pytest.fixture(scope="module")
def model_folder(converted_tiny, tmp_path_factory):
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("demo") / "model")


def test_demo_serves_reconstruction_and_chat(app_module, model_folder, tmp_path):
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_new_tokens=4)
    app = app_module.build_demo(demo)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(
            app.local_url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False
        )
        views = [gradio_client.handle_file(str(view)) for view in VIEWS]

        glb, gallery, depth, downloads, status = client.predict(
            views, None, 10, 0, True, "image", api_name="/reconstruct"
        )
        scene = trimesh.load(glb, force="scene")
        clouds = [geometry for geometry in scene.geometry.values() if isinstance(geometry, trimesh.PointCloud)]
        assert Path(glb).suffix == ".glb" and clouds and len(clouds[0].vertices) > 0
        assert sum(name.startswith("camera_") for name in scene.graph.nodes_geometry) == len(VIEWS)
        assert [item["caption"] for item in gallery] == [view.name for view in VIEWS]
        assert [item["caption"] for item in depth] == [f"{view.name}: depth" for view in VIEWS]
        names = sorted(Path(path).name for path in downloads)
        assert {"scene.glb", "points.ply", "cameras.json"} <= set(names)
        assert ("colmap.zip" in names) != ("No COLMAP model" in status)  # a zip, or the reason why not
        assert status.startswith(f"Reconstructed {len(VIEWS)} views")

        # display options redraw the kept scene without the model: cameras hidden, points coloured by view
        without = trimesh.load(client.predict(0, False, "view", api_name="/redraw"), force="scene")
        assert not any(name.startswith("camera_") for name in without.graph.nodes_geometry)
        [cloud] = [g for g in without.geometry.values() if isinstance(g, trimesh.PointCloud)]
        palette = {tuple(colour) for colour in app_module.view_colours(len(VIEWS))}
        assert {tuple(colour) for colour in np.asarray(cloud.colors)[:, :3]} <= palette

        history, box, used = client.predict(views, QUESTION, [], None, 10, api_name="/ask")
        assert box == ""
        assert [turn["role"] for turn in history] == ["user", "assistant"]
        answer = history[1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        expected = demo.answer([str(view) for view in VIEWS], QUESTION)  # the app returns the model's answer
        assert answer == f"{expected}\n\n*Views used: {', '.join(view.name for view in VIEWS)}*"
        assert [item["caption"] for item in used] == [view.name for view in VIEWS]

        # readable errors, not a bare "Error"
        with pytest.raises(gradio_client.exceptions.AppError, match="Upload images"):
            client.predict([], None, 10, 0, True, "image", api_name="/reconstruct")
        with pytest.raises(gradio_client.exceptions.AppError, match="Type a question"):
            client.predict(views, "  ", [], None, 10, api_name="/ask")
    finally:
        app.close()
        demo.close()
    assert not Path(demo.scratch.name).exists()  # the written scenes do not outlive the demo


def test_demo_reads_a_video_with_a_frame_interval(app_module, model_folder, tmp_path):
    av = pytest.importorskip("av", reason='videos need PyAV: pip install -e ".[demo]"')
    video = tmp_path / "walk.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 112, 84, "yuv420p"
        for index in range(7):
            frame = np.full((84, 112, 3), 30 * index, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    demo = app_module.G2VLMDemo(str(model_folder), device="cpu", max_new_tokens=2)
    try:
        views, names = demo.views(None, str(video), every=3)
        assert names == ["frame 0", "frame 3", "frame 6"] and len(views) == 3
        _, _, depth, _, scene, _ = demo.reconstruct(None, str(video), 3)
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
        *_, scene, _ = demo.reconstruct([str(view) for view in VIEWS], percentile=0)
        total = scene.world_points[..., 0].size
        counts = {}
        for percentile in (0, 50, 90):
            glb = trimesh.load(demo.viewer_scene(scene, percentile, True, "image"), force="scene")
            [cloud] = [g for g in glb.geometry.values() if isinstance(g, trimesh.PointCloud)]
            counts[percentile] = len(cloud.vertices)
        assert counts[0] == total
        assert abs(counts[50] - total / 2) <= 0.01 * total and abs(counts[90] - total / 10) <= 0.01 * total
    finally:
        plain.close()
        demo.close()
