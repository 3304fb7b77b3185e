"""The demo driven in a real browser: headless Chromium (Debian package `chromium`) through Playwright, on a
1366x768 laptop screen.

One test per promise of the page: with 20 views Reconstruct and the display controls stay above the fold and the
cameras visibly change the picture; the downloaded "shown" points are the points the view draws, and a value typed
into a slider's number box redraws; a view turned by dragging keeps its viewpoint when a filter redraws it (Reset
view and a new scene frame it again); the point size changes the picture; two points clicked in the 3D view give
their distance; a run locks its inputs; a bad file leaves the previous results in place; the chat answers with the
views it used and the depth tab shows every view. The 3D view (demo/point_viewer.js) exposes its camera, point count
and picks as data attributes, which the tests read. Screenshots go to `G2VLM_SCREENSHOT_DIR`
(else the test's temporary folder).

Skipped, with the reason, when Playwright or Chromium is missing:
    apt-get install -y chromium          # Debian; or point G2VLM_CHROMIUM at a Chromium/Chrome binary
    pip install -e ".[test,demo]"        # playwright (the Python package; its own browser download is not needed)
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason='the demo needs gradio: pip install -e ".[demo]"')
trimesh = pytest.importorskip("trimesh")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason='the browser test needs playwright: pip install -e ".[test]"'
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import VIEWS, fast_tiny_copy  # noqa: E402  (after the sys.path entry)

APP = Path(__file__).resolve().parents[1] / "demo" / "app.py"
CHROMIUM = os.environ.get("G2VLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = "Which view shows more of the red box?"
LAPTOP = {"width": 1366, "height": 768}
BACKGROUND = np.array([31, 31, 36])  # the viewer's clear colour (0.12, 0.12, 0.14)
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

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed: apt-get install -y chromium (or set G2VLM_CHROMIUM)"
)


def load_app_module():
    spec = importlib.util.spec_from_file_location("g2vlm_demo_app_browser", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(converted_tiny, tmp_path_factory):
    """The demo on 127.0.0.1 and a headless Chromium, shared by the tests of this module."""
    folder = tmp_path_factory.mktemp("browser")
    app_module = load_app_module()
    demo = app_module.G2VLMDemo(str(fast_tiny_copy(converted_tiny, folder / "model")), device="cpu", max_new_tokens=4)
    app = app_module.build_demo(demo)
    app_module.launch(app, demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(folder / "chromium-profile"),  # a new, empty profile (--user-data-dir)
                executable_path=CHROMIUM,
                args=CHROMIUM_ARGS,
                headless=True,
                viewport=LAPTOP,
                accept_downloads=True,
            )
            try:
                yield demo, app, browser
            finally:
                browser.close()
    finally:
        app.close()
        demo.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("G2VLM_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(served):
    _, app, browser = served
    page = browser.new_page()
    page.goto(app.local_url)
    return page


def reconstruct(page, paths: list[str]) -> None:
    page.locator("#views-input input[type=file]").set_input_files(paths)
    page.get_by_text(f"{len(paths)} images").first.wait_for(timeout=60_000)
    page.locator("#reconstruct-button").click()
    page.get_by_text(f"Reconstructed {len(paths)} views").wait_for(timeout=180_000)


def shown_points(page) -> int:
    text = page.locator("#status").inner_text()
    return int(re.search(r"Showing ([\d,]+) of", text).group(1).replace(",", ""))


def viewer_data(page, name: str) -> str | None:
    """A data attribute of the 3D viewer (`camera`, `points`, `scene`, `pointSize`), as the page's script set it."""
    return page.locator("#scene-viewer canvas").evaluate(f"canvas => canvas.closest('[data-points]')?.dataset.{name}")


def viewer_camera(page) -> dict:
    return json.loads(viewer_data(page, "camera"))


def turn_the_view(page) -> None:
    """Drag across the 3D view (left button: turns it)."""
    box = page.locator("#scene-viewer canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 40, steps=8)
    page.mouse.up()


def differing(first: np.ndarray, second: np.ndarray) -> int:
    return int((np.abs(first - second).sum(axis=-1) > 30).sum())


def viewer_pixels(page) -> np.ndarray:
    canvas = page.locator("#scene-viewer canvas")
    canvas.wait_for(timeout=60_000)
    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)


def drawn_pixels(pixels: np.ndarray) -> int:
    return int((np.abs(pixels - BACKGROUND).sum(axis=-1) > 30).sum())


def wait_for_picture(page, condition, timeout_s: float = 60.0) -> np.ndarray:
    """The viewer's pixels once `condition(pixels)` holds (the data arrive and are drawn asynchronously, slowly
    under SwiftShader on a busy machine), after which they must stay so for a moment (the drawing is complete)."""
    waited = 0.0
    while True:
        pixels = viewer_pixels(page)
        if condition(pixels):
            page.wait_for_timeout(1_000)
            return viewer_pixels(page)
        assert waited < timeout_s, "the 3D viewer did not draw what was expected in time"
        page.wait_for_timeout(500)
        waited += 0.5


def twenty_views(folder: Path) -> list[str]:
    """20 views with their own names (the fixture's views, shifted a little each time)."""
    paths = []
    for index in range(20):
        image = Image.open(VIEWS[index % len(VIEWS)]).convert("RGB")
        shifted = np.roll(np.asarray(image), index, axis=1)
        path = folder / f"room_photo_{index:02d}_with_a_long_name.png"
        Image.fromarray(shifted).save(path)
        paths.append(str(path))
    return paths


def test_twenty_views_fit_the_laptop_screen_and_cameras_show(served, tmp_path, shots):
    page = open_page(served)
    page.locator("#views-input input[type=file]").set_input_files(twenty_views(tmp_path))
    page.get_by_text("20 images").first.wait_for(timeout=60_000)
    for control in ("#reconstruct-button", "#show-cameras", "#outliers", "#max-points"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["y"] + box["height"] <= LAPTOP["height"], f"{control} is below the fold: {box}"
    page.locator("#reconstruct-button").click()
    page.get_by_text("Reconstructed 20 views").wait_for(timeout=180_000)
    with_cameras = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 500)
    page.screenshot(path=str(shots / "demo_20_views.png"))

    page.locator("#show-cameras input").uncheck()
    changed = lambda pixels: differing(with_cameras, pixels)
    without_cameras = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 500 and changed(pixels) > 300)
    assert changed(without_cameras) > 300
    page.close()


def test_downloads_hold_the_points_the_view_shows(served, tmp_path, shots):
    page = open_page(served)
    reconstruct(page, [str(view) for view in VIEWS])
    before = shown_points(page)
    # a value typed into the slider's number box redraws (and rewrites the downloads)
    number = page.locator("#outliers input[type=number]")
    number.fill("15")
    number.press("Enter")
    page.wait_for_function(
        f"!document.querySelector('#status').innerText.includes('Showing {before:,} of')", timeout=30_000
    )
    after = shown_points(page)
    assert after < before
    page.wait_for_function(
        f"document.querySelector('#scene-viewer canvas').closest('[data-points]').dataset.points == '{after}'",
        timeout=30_000,
    )
    with page.expect_download() as download:
        page.locator('#downloads a[download="shown_points.ply"]').click()
    ply = tmp_path / "shown_points.ply"
    download.value.save_as(ply)
    assert len(trimesh.load(ply).vertices) == int(viewer_data(page, "points")) == after

    # a bad file: the message names it (no server folder) and the previous results stay
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.locator('#views-input button[aria-label="Clear"]').click()  # the file box's own clear, not the page's
    page.locator("#views-input input[type=file]").set_input_files([str(bad)])
    page.get_by_text("None of the 1 files can be used: notes.png is not an image").first.wait_for(timeout=30_000)
    page.locator("#reconstruct-button").click()
    page.get_by_text("The previous results are kept").wait_for(timeout=60_000)
    status = page.locator("#status").inner_text()
    assert "notes.png" in status and "/tmp" not in status and str(tmp_path) not in status
    assert page.locator('#downloads a[download="shown_points.ply"]').count() == 1
    assert drawn_pixels(viewer_pixels(page)) > 500
    page.close()


def test_a_run_locks_its_inputs(served, shots):
    demo, _, _ = served
    page = open_page(served)
    release = threading.Event()
    reconstruct_views = demo.model.reconstruct

    def held(*args, **kwargs):
        release.wait(timeout=120)
        return reconstruct_views(*args, **kwargs)

    demo.model.reconstruct = held
    try:
        page.locator("#views-input input[type=file]").set_input_files([str(view) for view in VIEWS[:2]])
        page.get_by_text("2 images").first.wait_for(timeout=60_000)
        page.locator("#reconstruct-button").click()
        page.get_by_text("Reconstructing… (inputs locked)").wait_for(timeout=30_000)
        assert page.locator("#reconstruct-button").is_disabled() and page.locator("#clear-button").is_disabled()
        assert page.locator("#views-input input[type=file]").count() == 0  # no upload while it runs
        assert not page.get_by_text("room, turning (3 views)").is_visible()  # nor an example
        release.set()
        page.get_by_text("Reconstructed 2 views").wait_for(timeout=120_000)
        page.locator("#reconstruct-button").wait_for(state="visible")
        assert page.locator("#reconstruct-button").is_enabled()
        assert page.locator("#views-input input[type=file]").count() == 1
    finally:
        release.set()
        demo.model.reconstruct = reconstruct_views

    # Clear empties the inputs and the results
    page.locator("#clear-button").click()
    page.wait_for_function("!document.querySelector('#status').innerText.includes('Reconstructed')", timeout=30_000)
    assert "view_0.png" not in page.locator("#views-input").inner_text()
    page.close()


def test_chat_depth_measure_and_examples(served, shots):
    demo, _, _ = served
    page = open_page(served)
    two_views = [str(view) for view in VIEWS[:2]]
    reconstruct(page, two_views)

    question = page.locator("#question textarea")
    question.fill(QUESTION)
    page.locator("#ask-button").click()
    page.get_by_text("Views used: view_0.png, view_1.png").wait_for(timeout=120_000)
    answer = demo.answer(two_views, QUESTION)
    chat_text = page.locator("#chat").inner_text()
    assert QUESTION in chat_text and (answer.strip() == "" or answer.split()[0] in chat_text)
    page.screenshot(path=str(shots / "demo_chat.png"))

    page.get_by_role("tab", name="Depth").click()
    depth = page.locator("#depth-gallery img")
    depth.nth(1).wait_for(timeout=30_000)
    assert depth.count() == 2

    page.get_by_role("tab", name="Measure").click()
    image = page.locator("#measure-image img")
    image.wait_for(timeout=30_000)
    box = image.bounding_box()  # the page shows the image centred in this box, at most at its own size
    image.click(position={"x": box["width"] / 2 - 100, "y": box["height"] / 2})
    page.get_by_text("Click a second point").wait_for(timeout=30_000)
    image.click(position={"x": box["width"] / 2 + 100, "y": box["height"] / 2})
    page.wait_for_function("document.querySelector('#measure-text').innerText.includes('scene units')", timeout=30_000)
    assert re.search(r"distance [\d.e+-]+ scene units", page.locator("#measure-text").inner_text())
    page.screenshot(path=str(shots / "demo_measure.png"))

    # a bundled example scene is one click away: its views land in the upload box and the preview
    page.get_by_text("room, turning (3 views)").click()
    page.get_by_text("3 images").first.wait_for(timeout=60_000)
    page.close()


def test_the_viewpoint_survives_redraws_and_a_new_scene_is_framed(served, shots):
    page = open_page(served)
    reconstruct(page, [str(view) for view in VIEWS])
    wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 500)
    framed = viewer_camera(page)
    scene = viewer_data(page, "scene")

    turn_the_view(page)
    turned = viewer_camera(page)
    assert turned["yaw"] != framed["yaw"] and turned["pitch"] != framed["pitch"]
    before = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 500)

    # a filter redraws the same scene: other points, the same viewpoint
    number = page.locator("#max-points input[type=number]")
    number.fill("1000")
    number.press("Enter")
    page.wait_for_function(
        "document.querySelector('#scene-viewer canvas').closest('[data-points]').dataset.points == '1000'",
        timeout=30_000,
    )
    after = wait_for_picture(page, lambda pixels: differing(before, pixels) > 200)
    assert viewer_camera(page) == turned and viewer_data(page, "scene") == scene
    page.screenshot(path=str(shots / "demo_turned.png"))
    # another tab and back: the same view
    page.get_by_role("tab", name="Depth").click()
    page.get_by_role("tab", name="3D scene").click()
    assert differing(after, wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 300)) < 50
    assert viewer_camera(page) == turned

    # "Reset view" frames the scene again; a new reconstruction does too
    page.locator("#reset-view").click()
    reset = viewer_camera(page)
    assert (reset["yaw"], reset["pitch"]) == (framed["yaw"], framed["pitch"])
    turn_the_view(page)
    assert viewer_camera(page)["yaw"] != framed["yaw"]
    page.locator("#reconstruct-button").click()
    page.wait_for_function(
        f"document.querySelector('#scene-viewer canvas').closest('[data-points]').dataset.scene != '{scene}'",
        timeout=180_000,
    )
    again = viewer_camera(page)
    assert (again["yaw"], again["pitch"]) == (framed["yaw"], framed["pitch"])
    assert differing(after, wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 300)) > 200
    page.close()


def test_the_point_size_control_changes_the_picture(served, shots):
    page = open_page(served)
    reconstruct(page, [str(view) for view in VIEWS[:2]])
    small = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 300)
    camera = viewer_camera(page)
    page.locator("#point-size").fill("8")
    large = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 1.3 * drawn_pixels(small), timeout_s=20)
    assert viewer_data(page, "pointSize") == "8" and viewer_camera(page) == camera
    assert drawn_pixels(large) > 1.3 * drawn_pixels(small)
    page.close()


def test_clicking_two_points_of_the_3d_view_gives_their_distance(served, tmp_path, shots):
    page = open_page(served)
    reconstruct(page, [str(view) for view in VIEWS[:2]])
    page.locator("#show-cameras input").uncheck()  # only points are drawn: every drawn pixel can be picked
    page.wait_for_function(
        "document.querySelector('#scene-viewer canvas').closest('[data-points]').dataset.lines == '0'",
        timeout=30_000,
    )
    pixels = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 300)
    rows, columns = np.nonzero(np.abs(pixels - BACKGROUND).sum(axis=-1) > 30)
    # not under the tool bar or the help line, nor at the rounded edge (the page shows through its corners)
    inside = (rows > 40) & (rows < pixels.shape[0] - 30) & (columns > 8) & (columns < pixels.shape[1] - 8)
    rows, columns = rows[inside], columns[inside]
    canvas = page.locator("#scene-viewer canvas")
    for index in (np.argmin(columns), np.argmax(columns)):  # the leftmost and the rightmost drawn pixel
        canvas.click(position={"x": float(columns[index]) + 0.5, "y": float(rows[index]) + 0.5})
    page.wait_for_function(
        "document.querySelector('#scene-viewer canvas').closest('[data-points]').dataset.distance !== undefined",
        timeout=30_000,
    )
    picks = np.array(json.loads(viewer_data(page, "picks")))
    distance = float(viewer_data(page, "distance"))
    assert picks.shape == (2, 3) and distance == pytest.approx(np.linalg.norm(picks[0] - picks[1]), rel=1e-5)
    shown = re.search(r"A to B: ([\d.e+-]+) scene units", page.locator("#scene-viewer").inner_text())
    assert distance > 0 and float(shown.group(1)) == pytest.approx(distance, rel=1e-3)
    page.locator("#point-size").fill("4")
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "demo_pick_3d.png"))

    # the picked points are points of the scene: vertices of the downloaded "shown" cloud
    with page.expect_download() as download:
        page.locator('#downloads a[download="shown_points.ply"]').click()
    ply = tmp_path / "shown_points.ply"
    download.value.save_as(ply)
    cloud = np.asarray(trimesh.load(ply).vertices)
    nearest = np.linalg.norm(cloud[None] - picks[:, None], axis=-1).min(axis=1)
    assert (nearest <= 1e-5 * np.linalg.norm(np.ptp(cloud, axis=0))).all()
    page.close()
