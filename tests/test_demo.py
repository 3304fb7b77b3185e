"""The Gradio demo (`demo/app.py`), started headless on 127.0.0.1 and driven through its API with gradio_client.

Skipped when gradio is not installed (it is the optional extra `demo`: `pip install -e ".[demo]"`; the test extra
does not pull it in). Offline: the model is a local converted folder, and gradio's analytics are turned off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no network calls
gradio = pytest.importorskip("gradio", reason='the demo needs gradio: pip install -e ".[demo]"')
gradio_client = pytest.importorskip(
    "gradio_client", reason='the demo test needs gradio_client: pip install -e ".[demo]"'
)
trimesh = pytest.importorskip("trimesh")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import VIEWS, fast_tiny_copy

APP = Path(__file__).resolve().parents[1] / "demo" / "app.py"
QUESTION = "How far is the red box from the blue wall?"


def load_app_module():
    spec = importlib.util.spec_from_file_location("g2vlm_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_serves_reconstruction_and_chat(converted_tiny, tmp_path):
    app_module = load_app_module()
    demo = app_module.G2VLMDemo(str(fast_tiny_copy(converted_tiny, tmp_path / "model")), device="cpu", max_new_tokens=4)
    app = app_module.build_demo(demo)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(
            app.local_url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False
        )
        views = [gradio_client.handle_file(str(view)) for view in VIEWS]

        glb = client.predict(views, api_name="/reconstruct")
        scene = trimesh.load(glb, force="scene")
        clouds = [geometry for geometry in scene.geometry.values() if isinstance(geometry, trimesh.PointCloud)]
        assert Path(glb).suffix == ".glb" and clouds and len(clouds[0].vertices) > 0

        history, box = client.predict(views, QUESTION, [], api_name="/ask")
        assert box == ""
        assert [turn["role"] for turn in history] == ["user", "assistant"]
        answer = history[1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        assert answer == demo.answer([str(view) for view in VIEWS], QUESTION)  # the app returns the model's answer
    finally:
        app.close()
        demo.close()
    assert not Path(demo.scratch.name).exists()  # the written scenes do not outlive the demo
