"""The demo driven in a real browser: headless Chromium (Debian package `chromium`) through Playwright.

Uploads two views, reconstructs, checks that the 3D viewer drew the scene (its canvas holds many pixels that are not
the background), that the input gallery and the depth tab show both views, that the chat answers with the views it
used, and saves a screenshot (`G2VLM_SCREENSHOT_DIR`, else the test's temporary folder).

Skipped, with the reason, when Playwright or Chromium is missing:
    apt-get install -y chromium          # Debian; or point G2VLM_CHROMIUM at a Chromium/Chrome binary
    pip install -e ".[test,demo]"        # playwright (the Python package; its own browser download is not needed)
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason='the demo needs gradio: pip install -e ".[demo]"')
pytest.importorskip("trimesh")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason='the browser test needs playwright: pip install -e ".[test]"'
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import VIEWS, fast_tiny_copy  # noqa: E402  (after the sys.path entry)

APP = Path(__file__).resolve().parents[1] / "demo" / "app.py"
CHROMIUM = os.environ.get("G2VLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = "Which view shows more of the red box?"
# Chromium as root in a container, offline: no sandbox, no GPU (WebGL through SwiftShader), nothing phoned home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def load_app_module():
    spec = importlib.util.spec_from_file_location("g2vlm_demo_app_browser", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed: apt-get install -y chromium (or set G2VLM_CHROMIUM)"
)
def test_demo_in_headless_chromium(converted_tiny, tmp_path):
    app_module = load_app_module()
    demo = app_module.G2VLMDemo(str(fast_tiny_copy(converted_tiny, tmp_path / "model")), device="cpu", max_new_tokens=4)
    app = app_module.build_demo(demo)
    app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    shots = Path(os.environ.get("G2VLM_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    two_views = [str(view) for view in VIEWS[:2]]
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a new, empty profile (--user-data-dir)
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1600, "height": 1000},
            )
            try:
                page = browser.new_page()
                page.goto(app.local_url)
                page.locator("#views-input input[type=file]").set_input_files(two_views)
                gallery = page.locator("#input-gallery img")
                gallery.nth(1).wait_for(timeout=60_000)
                assert gallery.count() == 2

                page.locator("#reconstruct-button").click()
                page.get_by_text("Reconstructed 2 views").wait_for(timeout=120_000)
                canvas = page.locator("#scene-viewer canvas")
                canvas.wait_for(timeout=60_000)
                page.wait_for_timeout(3_000)  # let the viewer load the GLB and draw a few frames
                pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).reshape(-1, 3)
                background = np.array([31, 31, 36])  # the viewer's clear colour (0.12, 0.12, 0.14)
                drawn = (np.abs(pixels.astype(int) - background).sum(axis=1) > 30).sum()
                assert drawn > 500, f"the 3D viewer drew only {drawn} non-background pixels"
                listed = page.locator("#downloads").inner_text().replace("\n", "")
                for name in ("scene.glb", "points.ply", "cameras.json"):
                    assert name in listed, f"no {name} among the downloads: {listed!r}"

                question = page.locator("#question textarea")
                question.fill(QUESTION)
                page.locator("#ask-button").click()
                used = page.get_by_text("Views used: view_0.png, view_1.png")
                used.wait_for(timeout=120_000)
                answer = demo.answer(two_views, QUESTION)
                chat_text = page.locator("#chat").inner_text()
                assert QUESTION in chat_text and (answer.strip() == "" or answer.split()[0] in chat_text)
                page.screenshot(path=str(shots / "demo_browser.png"), full_page=True)

                page.get_by_role("tab", name="Depth").click()
                depth = page.locator("#depth-gallery img")
                depth.nth(1).wait_for(timeout=30_000)
                assert depth.count() == 2
                page.screenshot(path=str(shots / "demo_browser_depth.png"), full_page=True)

                # a bundled example scene is one click away: its views land in the upload box and the gallery
                page.get_by_text("room, turning (3 views)").click()
                gallery.nth(2).wait_for(timeout=60_000)
                assert gallery.count() == 3
            finally:
                browser.close()
    finally:
        app.close()
        demo.close()
    assert (shots / "demo_browser.png").stat().st_size > 10_000
