"""The demo driven in a real browser: headless Chromium (Debian package `chromium`) through Playwright, on a
1366x768 laptop screen (and 1920x1080 for the layout), with realistic inputs: textured 640x480 photos, geometry
views 252 pixels wide (20 photos give about a million points, over the page's 200,000 cap).

One test per promise of the page: with 20 photos Reconstruct and the display controls stay above the fold and the
camera cones change at least 0.5% of the view; a typed filter value changes what passes and what is drawn, and the
downloaded "shown" points are the drawn ones; a setting typed during a run applies to its result; Cancel stops the
model and unlocks the page; a request too large for the machine is refused with an estimate and the server goes on;
the tabs do not move the controls and nothing is clipped at 1366x768 or 1920x1080; a view turned by dragging keeps
its viewpoint when a filter redraws it; the point size changes the picture; two points clicked in the 3D view give
their distance; the chat answers with the views it used, a question without views gets one warning; an example scene
reconstructs in one click. The 3D view (demo/point_viewer.js) exposes its camera, point count
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
from conftest import greedy_answer  # noqa: E402
from demo_photos import photos, realistic_copy  # noqa: E402  (after the sys.path entry)

APP = Path(__file__).resolve().parents[1] / "demo" / "app.py"
CHROMIUM = os.environ.get("G2VLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = "Which view shows more of the red box?"
LAPTOP = {"width": 1366, "height": 768}
DESKTOP = {"width": 1920, "height": 1080}
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
    demo = app_module.G2VLMDemo(str(realistic_copy(converted_tiny, folder / "model")), device="cpu", max_new_tokens=4)
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
                yield demo, app, browser, folder
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
    _, app, browser, _ = served
    page = browser.new_page()
    page.goto(app.local_url)
    return page


def reconstruct(page, paths: list[str]) -> None:
    page.locator("#views-input input[type=file]").set_input_files(paths)
    page.get_by_text(f"{len(paths)} images").first.wait_for(timeout=60_000)
    page.locator("#reconstruct-button").click()
    page.get_by_text(f"Reconstructed {len(paths)} views:").wait_for(timeout=180_000)


def counts(page) -> tuple[int, int]:
    """(passing, shown) points, from the status line."""
    text = page.locator("#status").inner_text()
    passing = int(re.search(r"([\d,]+) of [\d,]+ points pass", text).group(1).replace(",", ""))
    shown = re.search(r"; ([\d,]+) of them are shown", text)
    return passing, passing if shown is None else int(shown.group(1).replace(",", ""))


def type_number(page, control: str, value: str) -> None:
    """Type `value` into a slider's number box (and press Enter)."""
    number = page.locator(f"{control} input[type=number]")
    number.fill(value)
    number.press("Enter")


def download_shown(page, folder: Path) -> np.ndarray:
    """Ask for the "shown" files and download the PLY: its vertices."""
    page.locator("#download-shown").click()
    link = page.locator('#downloads a[download="shown_points.ply"]')
    link.wait_for(timeout=60_000)
    with page.expect_download() as download:
        link.click()
    ply = folder / "shown_points.ply"
    download.value.save_as(ply)
    return np.asarray(trimesh.load(ply).vertices)


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


def wait_for_points(page, count: int) -> None:
    page.wait_for_function(
        f"document.querySelector('#scene-viewer canvas').closest('[data-points]')?.dataset.points == '{count}'",
        timeout=60_000,
    )


@pytest.fixture(scope="module")
def twenty(served) -> list[str]:
    """20 textured 640x480 photos."""
    return photos(served[3] / "twenty", 20)


def test_twenty_photos_fit_the_laptop_screen_and_cameras_show(served, twenty, shots):
    page = open_page(served)
    page.locator("#views-input input[type=file]").set_input_files(twenty)
    page.get_by_text("20 images").first.wait_for(timeout=60_000)
    assert re.search(r"about \d+\.\d GB and about \d+ s", page.locator("#input-note").inner_text())  # the estimate
    for control in ("#reconstruct-button", "#show-cameras", "#outliers", "#max-points"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["y"] + box["height"] <= LAPTOP["height"], f"{control} is below the fold: {box}"
    page.locator("#reconstruct-button").click()
    page.get_by_text("Reconstructed 20 views:").wait_for(timeout=180_000)
    passing, shown = counts(page)
    assert shown == 200_000 < passing  # over the cap: a sample of the points that pass
    wait_for_points(page, shown)
    with_cameras = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 5_000)
    page.screenshot(path=str(shots / "demo_20_views.png"))

    # the cones are drawn over the points: unticking them changes at least 0.5% of the view
    page.locator("#show-cameras input").uncheck()
    area = with_cameras.shape[0] * with_cameras.shape[1]
    changed = lambda pixels: differing(with_cameras, pixels)
    without_cameras = wait_for_picture(page, lambda pixels: changed(pixels) >= 0.005 * area, timeout_s=60)
    assert changed(without_cameras) >= 0.005 * area and viewer_data(page, "cones") == "0"
    page.close()


def test_a_typed_filter_changes_what_is_drawn_and_the_download_agrees(served, twenty, tmp_path, shots):
    page = open_page(served)
    reconstruct(page, twenty)
    passing, shown = counts(page)
    wait_for_points(page, shown)
    before = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 5_000)
    type_number(page, "#outliers", "15")
    page.wait_for_function(f"!document.querySelector('#status').innerText.includes('{passing:,} of')", timeout=60_000)
    tighter, tighter_shown = counts(page)
    assert tighter < passing and tighter_shown == min(tighter, 200_000)
    after = wait_for_picture(page, lambda pixels: differing(before, pixels) > 0.01 * before[..., 0].size)
    assert differing(before, after) > 0.01 * before[..., 0].size  # what is drawn changed, not only the count
    # a cap under what passes: the count shown changes; the downloaded "shown" points are the drawn ones
    type_number(page, "#max-points", "50000")
    wait_for_points(page, 50_000)
    assert counts(page) == (tighter, 50_000)
    cloud = download_shown(page, tmp_path)
    assert len(cloud) == int(viewer_data(page, "points")) == 50_000

    # a bad file: the message names it (no server folder) and the previous results stay
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.locator('#views-input button[aria-label="Clear"]').click()  # the file box's own clear, not the page's
    page.locator("#views-input input[type=file]").set_input_files([str(bad)])
    page.get_by_text("None of the 1 files can be used: notes.png is not an image").first.wait_for(timeout=30_000)
    page.locator("#reconstruct-button").click()
    page.get_by_text("The previous results are kept").wait_for(timeout=60_000)
    status = page.locator("#status").inner_text()
    assert "notes.png" in status and "/tmp" not in status and str(tmp_path) not in status and ".." not in status
    assert drawn_pixels(viewer_pixels(page)) > 5_000
    page.close()


def held_model(demo):
    """Hold the model's reconstruct until the returned event is set; returns (event, restore)."""
    release = threading.Event()
    reconstruct_views = demo.model.reconstruct

    def held(*args, **kwargs):
        release.wait(timeout=120)
        return reconstruct_views(*args, **kwargs)

    demo.model.reconstruct = held

    def restore():
        release.set()
        demo.model.reconstruct = reconstruct_views

    return release, restore


def test_a_setting_typed_during_a_run_applies_to_its_result_and_others_queue(served, twenty):
    demo = served[0]
    page = open_page(served)
    release, restore = held_model(demo)
    try:
        page.locator("#views-input input[type=file]").set_input_files(twenty)
        page.get_by_text("20 images").first.wait_for(timeout=60_000)
        page.locator("#reconstruct-button").click()
        page.locator("#cancel-button").wait_for(timeout=30_000)  # running, the inputs locked
        assert (
            page.locator("#views-input input[type=file]").count() == 0 and page.locator("#clear-button").is_disabled()
        )
        type_number(page, "#max-points", "30000")
        # a second user waits in the queue, and sees its position
        other = open_page(served)
        other.locator("#views-input input[type=file]").set_input_files(twenty[:2])
        other.get_by_text("2 images").first.wait_for(timeout=60_000)
        other.locator("#reconstruct-button").click()
        other.locator("#status").get_by_text(re.compile(r"queue: 1/1")).wait_for(timeout=30_000)
        release.set()
        page.get_by_text("Reconstructed 20 views:").wait_for(timeout=180_000)
        wait_for_points(page, 30_000)
        assert counts(page)[1] == 30_000
        assert page.locator("#reconstruct-button").is_enabled() and not page.locator("#cancel-button").is_visible()
        try:
            other.get_by_text("Reconstructed 2 views:").wait_for(timeout=120_000)  # then its turn comes
        except playwright_api.TimeoutError:  # seen once in CI, under load: say where the queued run stood
            pytest.fail(
                f"the queued run did not finish; its page's status reads {other.locator('#status').inner_text()!r}"
            )
    finally:
        restore()
    page.close()
    other.close()


def test_cancel_stops_the_model_and_unlocks_the_page(served, twenty):
    import torch

    demo = served[0]
    page = open_page(served)
    layers = [m for m in demo.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    ran = []
    hook = layers[-1][-1].register_forward_hook(lambda *args: ran.append(1))
    release, restore = held_model(demo)
    try:
        page.locator("#views-input input[type=file]").set_input_files(twenty[:4])
        page.get_by_text("4 images").first.wait_for(timeout=60_000)
        page.locator("#reconstruct-button").click()
        page.locator("#cancel-button").click(timeout=30_000)
        page.get_by_text("Cancelled. The previous results are kept.").wait_for(timeout=30_000)
        page.locator("#reconstruct-button").wait_for(state="visible")
        assert page.locator("#reconstruct-button").is_enabled()
        assert page.locator("#views-input input[type=file]").count() == 1
        release.set()  # the model gets its turn: it stops at its first layer
        page.wait_for_timeout(3_000)
        assert ran == [] and viewer_data(page, "points") in (None, "0")
    finally:
        restore()
        hook.remove()
    page.close()


def test_closing_the_page_stops_its_run(served, twenty):
    import time

    import torch

    demo = served[0]
    page = open_page(served)
    layers = [m for m in demo.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    ran = []
    hook = layers[-1][-1].register_forward_hook(lambda *args: ran.append(1))
    release, restore = held_model(demo)
    try:
        page.locator("#views-input input[type=file]").set_input_files(twenty[:4])
        page.get_by_text("4 images").first.wait_for(timeout=60_000)
        page.locator("#reconstruct-button").click()
        page.locator("#cancel-button").wait_for(timeout=30_000)
        deadline = time.monotonic() + 30
        while not demo._runs:  # the run has started (it waits in the held model)
            assert time.monotonic() < deadline
            time.sleep(0.2)
        runs = dict(demo._runs)
        assert len(runs) == 1 and not any(event.is_set() for event in runs.values())
        page.close()  # the session ends: gradio's unload event cancels its run
        deadline = time.monotonic() + 60
        while not all(event.is_set() for event in runs.values()):
            assert time.monotonic() < deadline, "closing the page did not stop its run"
            time.sleep(0.5)
        release.set()
        deadline = time.monotonic() + 30
        while demo._runs:  # the model stops at its first layer and the run ends
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ran == []
    finally:
        restore()
        hook.remove()


def test_a_request_too_large_is_refused_with_an_estimate_and_the_server_goes_on(served, twenty, tmp_path):
    demo = served[0]
    page = open_page(served)
    demo.memory_budget_gb = 2.0  # what a small machine has free
    try:
        many = photos(tmp_path / "many", 10) * 15  # 150 photos to upload
        page.locator("#views-input input[type=file]").set_input_files(many)
        page.get_by_text("150 views would need about").first.wait_for(timeout=120_000)
        page.locator("#reconstruct-button").click()
        page.get_by_text("Not reconstructed: 150 views would need").wait_for(timeout=60_000)
        status = page.locator("#status").inner_text()
        step = int(re.search(r"Use every (\d+)\w\w image", status).group(1))
        assert page.locator("#image-step input[type=number]").input_value() == str(step)
        # the server still answers: the smaller request that the page set up is previewed with its estimate
        page.get_by_text(f"{len(many[::step])} images").first.wait_for(timeout=60_000)
        assert re.search(r"will be reconstructed .*, about \d+\.\d GB", page.locator("#input-note").inner_text())
    finally:
        demo.memory_budget_gb = None
    page.close()


def test_the_layout_holds_at_laptop_and_desktop_sizes(served, twenty, shots):
    _, app, browser, _ = served
    for name, size in (("laptop", LAPTOP), ("desktop", DESKTOP)):
        page = browser.new_page()
        page.set_viewport_size(size)
        page.goto(app.local_url)
        assert page.get_by_role("link", name="Paper (arXiv 2511.21688)").get_attribute("href").endswith("2511.21688")
        assert "InternRobotics/G2VLM" in page.get_by_role("link", name="Official code (GitHub)").get_attribute("href")
        reconstruct(page, twenty[:3])
        display = page.locator("#display").first.bounding_box()
        for tab in ("Depth", "Measure", "Input views", "3D scene"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(300)
            moved = page.locator("#display").first.bounding_box()
            assert abs(moved["y"] - display["y"]) <= 4, f"the {tab} tab moves the controls at {name} size"
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        if name == "desktop":
            page.screenshot(path=str(shots / "demo_desktop.png"))
        page.close()


def test_chat_depth_measure_and_examples(served, twenty, shots):
    demo = served[0]
    page = open_page(served)
    # a question without views: one warning, no error pill
    page.locator("#question textarea").fill(QUESTION)
    page.locator("#ask-button").click()
    page.get_by_text("Upload images (or a video) of the scene first").first.wait_for(timeout=30_000)
    assert page.get_by_text("Error", exact=True).count() == 0

    two = twenty[:2]
    reconstruct(page, two)
    page.locator("#ask-button").click()
    page.get_by_text("Views used: photo_000.jpg, photo_001.jpg").wait_for(timeout=120_000)
    expected = greedy_answer(demo.model, demo.processor, two, QUESTION, demo.max_new_tokens)
    chat_text = page.locator("#chat").inner_text()
    assert expected and QUESTION in chat_text and expected in chat_text
    used = page.locator("#used-views")
    assert used.evaluate("e => [...e.querySelectorAll('*')].every(c => c.scrollHeight <= c.clientHeight + 2 || "
                         "getComputedStyle(c).overflowY !== 'hidden')")  # fmt: skip
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

    # an example scene is one click away: its thumbnail reconstructs it
    page.get_by_role("tab", name="3D scene").click()
    page.locator("#example-gallery button").first.click()
    page.get_by_text("Reconstructed 2 views:").wait_for(timeout=120_000)  # room, sliding (2 views)
    page.close()


def test_the_viewpoint_survives_redraws_and_a_new_scene_is_framed(served, twenty, shots):
    page = open_page(served)
    reconstruct(page, twenty[:4])
    wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 500)
    framed = viewer_camera(page)
    scene = viewer_data(page, "scene")

    turn_the_view(page)
    turned = viewer_camera(page)
    assert turned["yaw"] != framed["yaw"] and turned["pitch"] != framed["pitch"]
    before = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 500)

    # a filter redraws the same scene: other points, the same viewpoint
    type_number(page, "#max-points", "1000")
    wait_for_points(page, 1_000)
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


def test_the_point_size_control_changes_the_picture(served, twenty, shots):
    page = open_page(served)
    reconstruct(page, twenty[:2])
    page.locator("#show-cameras input").uncheck()
    page.wait_for_function(
        "document.querySelector('#scene-viewer canvas').closest('[data-points]').dataset.cones == '0'",
        timeout=30_000,
    )
    type_number(page, "#max-points", "5000")  # sparse enough for larger points to cover more of the view
    wait_for_points(page, 5_000)
    small = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 300)
    camera = viewer_camera(page)
    page.locator("#point-size").fill("8")
    large = wait_for_picture(page, lambda pixels: drawn_pixels(pixels) > 1.3 * drawn_pixels(small), timeout_s=20)
    assert viewer_data(page, "pointSize") == "8" and viewer_camera(page) == camera
    assert drawn_pixels(large) > 1.3 * drawn_pixels(small)
    page.close()


def test_clicking_two_points_of_the_3d_view_gives_their_distance(served, twenty, tmp_path, shots):
    page = open_page(served)
    reconstruct(page, twenty[:2])
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
    cloud = download_shown(page, tmp_path)
    nearest = np.linalg.norm(cloud[None] - picks[:, None], axis=-1).min(axis=1)
    assert (nearest <= 1e-5 * np.linalg.norm(np.ptp(cloud, axis=0))).all()
    page.close()
