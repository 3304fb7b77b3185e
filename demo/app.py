"""G²VLM demo: upload views (or a video) of one scene, see it in 3D with its cameras and depth, measure it, ask
spatial questions.

    pip install "g2vlm-hf[demo]"
    python demo/app.py --model user/g2vlm-2b          # a Hub id or a converted folder (or set G2VLM_MODEL)

As a Hugging Face Space: this file as `app.py`, `requirements.txt` naming g2vlm-hf[demo], and the `G2VLM_MODEL`
variable set to the model repository.

What it does: before a run the page estimates its memory and time from the number and size of the views and refuses
what the machine cannot hold (suggesting every k-th image); one reconstruction runs at a time (the others wait in the
queue, their position shown), Cancel or closing the page stops it. The views are reconstructed once
(`model.reconstruct`, checked by the export package's `check_reconstruction`); the 3D view (coloured points and one
solid camera cone per view, drawn over the points by the small WebGL viewer in `point_viewer.js`) is redrawn from the
kept reconstruction whenever a display control changes, keeping the viewpoint. The display settings are read when
the result is drawn, so a setting changed during a run applies to its result. The filters act first (outliers,
depth edges, black/white background, points of one view, confidence where the checkpoint has a confidence head),
then at most N of the points that pass are drawn; the status says how many pass and how many are shown. Downloads
are written when asked for: the "shown" files are exactly the drawn points and cameras (in the model's frame), the
"full" ones every point. Scratch files are bounded (old results removed past a size cap). The Measure tab gives the
distance between two clicked pixels; the chat answers with the views' geometry in the model's context, streamed,
and shows which views it used.
"""

import argparse
import base64
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from packaging.version import Version
from PIL import Image, ImageDraw
from transformers import TextIteratorStreamer

import g2vlm_hf  # noqa: F401  (registers G2VLM with the Auto classes)
from g2vlm_hf.chat import answer
from g2vlm_hf.export import (
    SceneArrays,
    check_reconstruction,
    colourise_depth,
    robust_scene_scale,
    save_point_cloud_ply,
    save_scene_glb,
    view_colours,
    write_colmap,
    write_scene,
)
from g2vlm_hf.inputs import iter_video_frames
from g2vlm_hf.model_loading import load_checked
from g2vlm_hf.point_filters import PointSelection, percentile_box, select_points
from g2vlm_hf.processing.image_io import load_image

# The 3D view's script follows new data through gr.HTML's `watch` (gradio 6.10 and later); the page is tested with
# 6.31 (on 6.10 the page fails in gradio's own dropdowns), so that is the floor.
MIN_GRADIO = "6.31"
if Version(gr.__version__) < Version(MIN_GRADIO):
    raise ImportError(
        f"The G2VLM demo needs gradio>={MIN_GRADIO}, found {gr.__version__}: pip install -U 'gradio>={MIN_GRADIO}'"
    )

DEFAULT_MODEL = os.environ.get("G2VLM_MODEL", "")
DEMO_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = DEMO_DIR / "examples"
MAX_FILE_MB = 100.0
SCRATCH_CAP_MB = 2_000.0
# The model's world frame is the first camera's OpenCV frame (y down, z forward); the viewer is y-up, so the scene it
# shows is turned half a turn about x. Downloads keep the model's frame.
VIEWER_FROM_WORLD = np.diag([1.0, -1.0, -1.0, 1.0])
# camera cone depth: 0.6 of the median distance between neighbouring cameras, at least CONE_MIN and at most CONE_MAX
# of the diagonal of the shown points' robust box (cameras that nearly coincide still get a visible cone)
CONE_SPACING = 0.6
CONE_MIN, CONE_MAX = 0.08, 0.25
# shading of a cone's faces (4 sides, then the base): a solid that reads as 3D without lighting
CONE_SHADES = np.array([1.0, 0.8, 0.62, 0.88, 0.5])
# a new scene is framed on the per-axis [p, 100-p] percentile box of its shown points: far outliers do not shrink it
FRAMING_PERCENTILE = 2.0
VIEWER_JS = (DEMO_DIR / "point_viewer.js").read_text(encoding="utf-8")
# The viewer's markup never changes (gradio re-renders a gr.HTML template on every new value and would otherwise
# replace the canvas); the data arrive through `props.value` and are drawn by VIEWER_JS.
VIEWER_HTML = """
<div class="point-viewer">
  <canvas class="point-canvas"></canvas>
  <div class="point-tools">
    <button type="button" id="reset-view">Reset view</button>
    <label>Point size <input type="range" id="point-size" min="1" max="12" step="1" value="2"></label>
  </div>
  <div class="point-readout"></div>
  <div class="point-help">drag: turn · shift- or right-drag: pan · wheel: zoom · click two points: distance</div>
  <div class="point-empty">Upload views or click an example scene, then press Reconstruct.</div>
</div>
"""
HEADER = """
<div id="g2vlm-header">
  <h1>G²VLM: 3D reconstruction and spatial reasoning from a few photos</h1>
  <p>A vision-language model with a geometry expert: from views of one scene it predicts the cameras, depth and a 3D
  point map, and answers spatial questions with that geometry in its context.
  <a href="https://arxiv.org/abs/2511.21688" target="_blank" rel="noopener">Paper (arXiv 2511.21688)</a> ·
  <a href="https://github.com/InternRobotics/G2VLM" target="_blank" rel="noopener">Official code (GitHub)</a></p>
</div>
"""
MEASURE_WIDTH = 512  # small views are enlarged to about this width for clicking
ALL_VIEWS = "all"
# an absolute path in a message (e.g. the server's upload folder): shown as its last part only
ABSOLUTE_PATH = re.compile(r"(?:/[^/\s'\"():]+)+/([^/\s'\"():]+)")
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="sky", neutral_hue="slate")
CSS = """
#g2vlm-header h1 {font-size: 1.25rem; margin: 0}
#g2vlm-header p {margin: 0; font-size: 0.85rem; opacity: 0.85}
#scene-viewer .html-container {padding: 0}
#scene-viewer .point-viewer {position: relative; height: 320px; border-radius: 6px; overflow: hidden;
  background: #1f1f24}
#scene-viewer canvas {display: block; width: 100%; height: 100%; cursor: grab; touch-action: none}
#scene-viewer .point-tools {position: absolute; top: 6px; left: 6px; display: flex; gap: 8px; align-items: center;
  color: #ddd; font-size: 12px; background: rgba(0, 0, 0, 0.6); padding: 3px 6px; border-radius: 4px}
#scene-viewer .point-tools button {color: #eee; border: 1px solid #888; border-radius: 4px; padding: 1px 6px}
#scene-viewer .point-tools input {width: 90px; vertical-align: middle}
#scene-viewer .point-help {position: absolute; bottom: 4px; right: 6px; color: #eee; font-size: 11px;
  background: rgba(0, 0, 0, 0.6); padding: 1px 6px; border-radius: 4px}
#scene-viewer .point-readout {position: absolute; top: 8px; right: 8px; color: #fff; font-size: 13px;
  background: rgba(0, 0, 0, 0.6); padding: 0 6px; border-radius: 4px}
#scene-viewer .point-readout:empty {display: none}
#scene-viewer .point-empty {position: absolute; inset: 0; display: flex; align-items: center;
  justify-content: center; color: #bbb; font-size: 14px; pointer-events: none}
#scene-viewer .point-viewer[data-drawn="1"] .point-empty {display: none}
#views-input .file-preview-holder {max-height: 9em; overflow-y: auto}
#views-input .file > * {padding: 2px 6px}
#views-input .download {min-width: 4.5rem; width: auto; font-size: 0.8rem}
#views-input .filename .stem {white-space: normal; overflow-wrap: anywhere}
#result-tabs .tabitem {height: 326px; overflow-y: auto}
#used-views {min-height: 150px}
#status {min-height: 56px}
"""


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def sentence(text: str) -> str:
    """`text` ending with exactly one full stop (messages are joined into lines without doubled punctuation)."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _paths(files: Sequence | None) -> list[str]:
    """File paths from what gr.File gives (paths, or objects with a `.name`)."""
    return [str(getattr(item, "name", item)) for item in files or []]


def without_paths(message: str) -> str:
    """`message` with every absolute path cut to its file name: the server's folders are nobody's business."""
    return ABSOLUTE_PATH.sub(r"\1", message)


def example_scenes() -> list[tuple[str, list[str]]]:
    """The bundled example scenes (one folder of views each): `(label, view paths)`."""
    folders = [folder for folder in sorted(EXAMPLES_DIR.iterdir()) if folder.is_dir()]
    scenes = [(folder, sorted(str(path) for path in folder.glob("*.png"))) for folder in folders]
    return [(f"{folder.name.replace('_', ', ')} ({len(paths)} views)", paths) for folder, paths in scenes]


def available_memory() -> float | None:
    """Bytes the run may still use: free memory of the GPU in use, else the system's available memory (Linux), else
    None (unknown: no memory check)."""
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class CostModel:
    """Memory and time of one reconstruction against its geometry tokens `T` (views x patches per view) and output
    pixels `P`: `memory = a T + b T^2 + c P` bytes, `time = d T + e T^2` seconds.

    The defaults are fitted (least squares, through zero) on `demo/benchmark_memory.py`'s measurements of the tiny
    test checkpoint on CPU (Intel Xeon, 640x480 photos at width 518, 1,036 tokens a view: +0.12 / 0.53 / 1.49 /
    3.18 GB and 4 / 11 / 35 / 95 s at 2 / 10 / 20 / 30 views); `memory_per_pixel` covers the page's own copy of the
    result. `scale` multiplies the model's part for a larger checkpoint (measure it with that script); the demo
    corrects the time by the runs it has seen."""

    memory_per_token: float = 2.0e4
    memory_per_token_pair: float = 2.6
    memory_per_pixel: float = 96.0
    seconds_per_token: float = 1.0e-4
    seconds_per_token_pair: float = 1.07e-7
    scale: float = 1.0

    def memory(self, tokens: int, pixels: int) -> float:
        model = self.memory_per_token * tokens + self.memory_per_token_pair * tokens * tokens
        return self.scale * model + self.memory_per_pixel * pixels

    def seconds(self, tokens: int) -> float:
        return self.scale * (self.seconds_per_token * tokens + self.seconds_per_token_pair * tokens * tokens)


class TooManyViews(ValueError):
    """More views than the model (or the machine) takes; `step` is the smallest 'every k-th' that fits."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class RunCancelled(Exception):
    """The run was cancelled (the Cancel button, or the page went away)."""


@dataclass
class Views:
    """The views of one request, their names, and what was skipped (one line per skipped file)."""

    images: list[Image.Image]
    names: list[str]
    skipped: list[str] = field(default_factory=list)

    def resized_note(self) -> str:
        """A sentence when views of other sizes will be resized to the first view's size, else ''."""
        first = self.images[0].size
        others = sum(image.size != first for image in self.images)
        if not others:
            return ""
        return f" {others} view{'s' if others > 1 else ''} of another size resized to the first view's {first[0]}x{first[1]}."


@dataclass
class Display:
    """The display controls, in the order of `build_demo`'s `display` inputs."""

    confidence: float = 0.0
    outliers: float = 2.0
    depth_edges: float = 0.0
    drop_black: bool = False
    drop_white: bool = False
    view: str = ALL_VIEWS
    max_points: int = 200_000
    show_cameras: bool = True
    colouring: str = "image"

    @property
    def one_view(self) -> int | None:
        return None if self.view in (ALL_VIEWS, None, "") else int(self.view)

    def selection(self, has_confidence: bool) -> PointSelection:
        return PointSelection(
            outlier_percentile=float(self.outliers),
            depth_edge_jump=float(self.depth_edges),
            drop_black=bool(self.drop_black),
            drop_white=bool(self.drop_white),
            views=None if self.one_view is None else [self.one_view],
            confidence_percentile=float(self.confidence) if has_confidence else 0.0,
            max_points=max(1, int(self.max_points)),
        )


@dataclass
class Scene:
    """One reconstruction (the checked arrays of the export package), kept per browser session so that the 3D view
    can be redrawn without the model; its files are written into `folder` when asked for."""

    folder: Path
    views: list[Image.Image]
    names: list[str]
    arrays: SceneArrays
    note: str = ""
    full_files: list[str] = field(default_factory=list)


@dataclass
class Shown:
    """What one drawing shows: the points and colours, the cameras and the counts."""

    points: np.ndarray
    colours: np.ndarray
    poses: np.ndarray
    cone_size: float
    camera_colours: np.ndarray
    passing: int
    total: int


@dataclass
class RunResult:
    """The outcome of a Reconstruct: the scene and its depth previews, or a message (and the image / frame step
    that fits, for too many views)."""

    status: str
    scene: Scene | None = None
    depth_previews: list = field(default_factory=list)
    image_step: int | None = None
    frame_step: int | None = None


def camera_cones(poses: np.ndarray, size: float, image_size: Sequence[int]) -> np.ndarray:
    """`(V, 5, 4)` corners (viewer frame) of each camera's cone, `size` deep: the apex, then the 4 base corners."""
    height, width = image_size
    half_h = 0.5 * size
    half_w = half_h * width / height
    local = np.array(
        [[0, 0, 0], [-half_w, -half_h, size], [half_w, -half_h, size], [half_w, half_h, size], [-half_w, half_h, size]]
    )
    homogeneous = np.concatenate([local, np.ones((5, 1))], axis=1)
    return np.einsum("vij,ej->vei", VIEWER_FROM_WORLD @ poses, homogeneous)[..., :3]


def cone_triangles(corners: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solid cones: `(V * 18, 3)` float32 triangle corners (4 sides and the base's 2 triangles per camera) and their
    uint8 colours (the camera's colour, shaded per face)."""
    faces = [(0, 1, 2), (0, 2, 3), (0, 3, 4), (0, 4, 1), (1, 2, 3), (1, 3, 4)]
    shade_of_face = [*CONE_SHADES[:4], CONE_SHADES[4], CONE_SHADES[4]]
    triangles = corners[:, [index for face in faces for index in face]]
    shades = np.repeat(shade_of_face, 3)
    shaded = np.clip(colours[:, None, :].astype(np.float64) * shades[None, :, None], 0, 255)
    return triangles.reshape(-1, 3).astype(np.float32), shaded.reshape(-1, 3).astype(np.uint8)


def cone_edges(corners: np.ndarray) -> np.ndarray:
    """`(V * 16, 3)` float32 line-segment ends of each cone's 8 edges (apex to the base corners, and the base)."""
    pairs = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4), (4, 1)]
    return corners[:, [index for pair in pairs for index in pair]].reshape(-1, 3).astype(np.float32)


def cone_size(centres: np.ndarray, extent: float) -> float:
    """Cone depth from the cameras' spacing (median distance to the nearest other camera), kept between CONE_MIN and
    CONE_MAX of the scene's extent: visible at any scene size, also when the cameras nearly coincide."""
    extent = extent if extent > 0 and math.isfinite(extent) else 1.0
    spacing = 0.0
    if len(centres) > 1:
        distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        np.fill_diagonal(distances, np.inf)
        spacing = float(np.median(distances.min(axis=1)))
    return float(np.clip(CONE_SPACING * spacing, CONE_MIN * extent, CONE_MAX * extent))


def _base64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def viewer_data(scene_id: str, shown: Shown, image_size: Sequence[int], show_cameras: bool) -> dict[str, Any]:
    """The value of the 3D viewer: the points turned y-up (little-endian float32 xyz, base64) with their uint8 RGB
    colours, the camera cones (solid triangles and edge lines, with colours; empty without cameras), the robust box
    a new scene is framed on (the points' percentile box and the camera centres), and the scene's id (a new id
    resets the viewpoint; a redraw of the same scene keeps it)."""
    viewer_points = (shown.points @ VIEWER_FROM_WORLD[:3, :3].T).astype("<f4")
    low, high = percentile_box(viewer_points, FRAMING_PERCENTILE)
    corners = camera_cones(shown.poses, shown.cone_size, image_size)
    low, high = np.minimum(low, corners[:, 0].min(axis=0)), np.maximum(high, corners[:, 0].max(axis=0))
    triangles, triangle_colours = cone_triangles(corners, shown.camera_colours)
    edges = cone_edges(corners)
    edge_colours = np.repeat((0.55 * shown.camera_colours).astype(np.uint8), 16, axis=0)
    if not show_cameras:
        triangles, triangle_colours, edges, edge_colours = (array[:0] for array in (
            triangles, triangle_colours, edges, edge_colours))  # fmt: skip
    return {
        "scene": scene_id,
        "count": len(viewer_points),
        "positions": _base64(viewer_points),
        "colours": _base64(shown.colours.astype(np.uint8)),
        "cones": _base64(triangles.astype("<f4")),
        "cone_colours": _base64(triangle_colours),
        "lines": _base64(edges.astype("<f4")),
        "line_colours": _base64(edge_colours),
        "box": [low.tolist(), high.tolist()],
    }


def decode_viewer_points(view: dict[str, Any]) -> np.ndarray:
    """The `(M, 3)` points of a viewer value (in the viewer's y-up frame)."""
    return np.frombuffer(base64.b64decode(view["positions"]), dtype="<f4").reshape(-1, 3)


class Scratch:
    """The demo's scratch folder: one folder per scene, removed with the scene's session, and the oldest removed
    once the whole exceeds `cap_bytes` (the newest is always kept)."""

    def __init__(self, cap_bytes: float) -> None:
        self.root = tempfile.TemporaryDirectory(prefix="g2vlm-demo-")
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return Path(self.root.name)

    def new_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="scene-", dir=self.root.name))

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.path.rglob("*") if path.is_file())

    def trim(self) -> None:
        """Remove the oldest scene folders while the scratch holds more than the cap."""
        with self._lock:
            folders = sorted((p for p in self.path.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            total = self.size()
            for folder in folders[:-1]:
                if total <= self.cap_bytes:
                    break
                total -= sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self.root.cleanup()


class G2VLMDemo:
    """The model behind the demo: reconstruction, filtered views, downloads, measuring and spatial chat."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_new_tokens: int = 128,
        max_points: int = 200_000,
        max_file_mb: float = MAX_FILE_MB,
        scratch_cap_mb: float = SCRATCH_CAP_MB,
        memory_budget_gb: float | None = None,
        costs: CostModel | None = None,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_checked(model, "auto", self.device)
        self.max_new_tokens = max_new_tokens
        self.max_points = max_points
        self.max_file_mb = max_file_mb
        self.memory_budget_gb = memory_budget_gb
        self.costs = costs or CostModel()
        self.time_correction = 1.0  # measured / estimated seconds of the runs so far
        self.has_confidence = bool(getattr(self.model.config, "use_confidence_head", False))
        self.scratch = Scratch(scratch_cap_mb * 1e6)
        # the run in progress (one at a time: the queue's concurrency limit), stopped between layers when cancelled
        self._runs: dict[str, threading.Event] = {}
        self._running: tuple[int, threading.Event] | None = None
        for module in self.model.modules():
            if isinstance(module, torch.nn.ModuleList):
                for layer in module:
                    layer.register_forward_pre_hook(self._stop_if_cancelled)

    def close(self) -> None:
        """Remove the scratch folder."""
        self.scratch.close()

    @property
    def max_views(self) -> int:
        return self.processor.geometry_image_processor.max_views

    # ------------------------------------------------------------------------------------------------ cancelling

    def _stop_if_cancelled(self, module: torch.nn.Module, args: Any) -> None:
        running = self._running
        if running is not None and running[0] == threading.get_ident() and running[1].is_set():
            raise RunCancelled("cancelled")

    def cancel(self, request: gr.Request | None = None) -> None:
        """Stop the session's run (the Cancel button; also when its page goes away)."""
        event = self._runs.get(getattr(request, "session_hash", None) or "")
        if event is not None:
            event.set()

    # ------------------------------------------------------------------------------------------------------ inputs

    def _too_large(self, path: str) -> str | None:
        size_mb = os.path.getsize(path) / 1e6
        if size_mb > self.max_file_mb:
            return f"{Path(path).name} is {size_mb:.1f} MB; files up to {self.max_file_mb:g} MB are accepted"
        return None

    def read_views(self, files: Sequence | None, video: str | None = None, every: int = 10, step: int = 1) -> Views:
        """The views to use: every `step`-th uploaded image (unreadable or too large files are skipped, each with a
        line in `skipped`), else every `every`-th frame of the video.

        Raises:
            ValueError: no usable view, images and a video at once, or (`TooManyViews`) more views than the model
                takes, with the smallest step that fits.
        """
        paths = _paths(files)
        if paths and video:
            raise ValueError("Give images or a video, not both: clear one of them.")
        if video:
            return self._video_views(video, max(1, int(every)))
        if not paths:
            raise ValueError("Upload images (or a video) of the scene first, or click an example scene.")
        step = max(1, int(step))
        chosen = paths[::step]
        if len(chosen) > self.max_views:
            fitting = math.ceil(len(paths) / self.max_views)
            raise TooManyViews(
                f"{len(chosen)} views, but this model takes at most {self.max_views} at once. Use every "
                f"{ordinal(fitting)} image (set below) or upload fewer.",
                fitting,
            )
        views = Views([], [])
        for path in chosen:
            problem = self._too_large(path)
            if problem is None:
                try:
                    views.images.append(load_image(path))
                    views.names.append(Path(path).name)
                    continue
                except ValueError as error:
                    problem = without_paths(str(error)).rstrip(".")
            views.skipped.append(problem)
        if not views.images:
            raise ValueError(f"None of the {len(chosen)} files can be used: " + sentence("; ".join(views.skipped)))
        return views

    def _video_views(self, video: str, every: int) -> Views:
        problem = self._too_large(video)
        if problem is not None:
            raise ValueError(sentence(problem))
        frames = list(iter_video_frames(Path(video), every, max_frames=self.max_views + 1))
        if len(frames) > self.max_views:
            raise TooManyViews(
                f"More than {self.max_views} frames at every {ordinal(every)} frame, but this model takes at most "
                f"{self.max_views} at once: use a larger frame interval (set below).",
                every * 2,
            )
        if len(frames) < 2:
            raise ValueError(
                f"Every {ordinal(every)} frame of this video gives a single view; a reconstruction needs at least "
                "2: use a smaller frame interval."
            )
        return Views(frames, [f"frame {index * every}" for index in range(len(frames))])

    # ---------------------------------------------------------------------------------------------------- estimate

    def tokens_and_pixels(self, views: Views) -> tuple[int, int]:
        """Geometry tokens and output pixels of a reconstruction of `views` (every view at the first one's size)."""
        processor = self.processor.geometry_image_processor
        width, height = views.images[0].size
        patch = processor.patch_size
        if processor.do_resize:
            width, height = (
                processor.target_width,
                max(1, round(height * processor.target_width / width / patch)) * patch,
            )
        per_view = (width // patch) * (height // patch)
        return len(views.images) * per_view, len(views.images) * per_view * patch * patch

    def estimate(self, views: Views) -> tuple[float, float]:
        """`(bytes, seconds)` a reconstruction of `views` is expected to take."""
        tokens, pixels = self.tokens_and_pixels(views)
        return self.costs.memory(tokens, pixels), self.costs.seconds(tokens) * self.time_correction

    def memory_budget(self) -> float | None:
        if self.memory_budget_gb is not None:
            return self.memory_budget_gb * 1e9
        available = available_memory()
        return None if available is None else 0.8 * available

    def check_fits(self, views: Views, video: bool) -> str:
        """A sentence with the estimate; raises TooManyViews (with every k-th that fits) when the machine cannot hold
        the run."""
        memory, seconds = self.estimate(views)
        size = f"about {memory / 1e9:.1f} GB" if memory >= 0.1e9 else "under 0.1 GB"
        text = f"{size} and about {max(1, round(seconds))} s"
        budget = self.memory_budget()
        if budget is None or memory <= budget:
            return text
        count = len(views.images)
        fitting = count
        while fitting > 1 and self.estimate(Views(views.images[:fitting], views.names[:fitting]))[0] > budget:
            fitting = max(1, int(fitting * 0.9))
        step = max(2, math.ceil(count / max(1, fitting)))
        what = "frame" if video else "image"
        raise TooManyViews(
            f"{count} views would need {text}, more than this machine has free ({budget / 1e9:.1f} GB). Use every "
            f"{ordinal(step)} {what} (set below) or fewer views.",
            step,
        )

    def preview(self, files: Sequence | None, video: str | None, every: float, step: float) -> tuple[list, str]:
        """The input gallery and a summary line: how many views a Reconstruct would use, its estimated memory and
        time, and what it would skip or resize."""
        if not _paths(files) and not video:
            return [], ""
        try:
            views = self.read_views(files, video, int(every), int(step))
            estimate = self.check_fits(views, bool(video))
        except ValueError as error:
            return [], f"⚠️ {without_paths(str(error))}"
        kind = "frames" if video else "images"
        summary = f"**{len(views.images)} {kind}** will be reconstructed"
        if not video and int(step) > 1:
            summary += f" (every {ordinal(int(step))} of {len(_paths(files))})"
        summary += f", {estimate}."
        summary += views.resized_note()
        if views.skipped:
            summary += " ⚠️ Skipped: " + sentence("; ".join(views.skipped))
        gallery = [(np.asarray(image), name) for image, name in zip(views.images, views.names)]
        return gallery, summary

    # --------------------------------------------------------------------------------------------- reconstruction

    def reconstruct(
        self,
        files: Sequence | None,
        video: str | None,
        every: float,
        step: float,
        request: gr.Request | None = None,
        progress: gr.Progress | None = None,
    ) -> RunResult:
        """Reconstruct the views (after checking that the machine can hold the run). On failure or cancel the
        result holds only a message (and, for too many views, the step that fits): the previous results stay."""
        progress = progress or (lambda *args, **kwargs: None)
        session = getattr(request, "session_hash", None) or ""
        cancelled = self._runs[session] = threading.Event()
        try:
            views = self.read_views(files, video, int(every), int(step))
            estimate = self.check_fits(views, bool(video))
            progress(0.1, desc=f"Reconstructing {len(views.images)} views ({estimate})")
            started = time.perf_counter()
            scene = self._run(views, cancelled)
            expected = self.estimate(views)[1] / self.time_correction
            self.time_correction = (time.perf_counter() - started) / max(expected, 1e-3)
        except TooManyViews as error:
            return RunResult(
                f"⚠️ Not reconstructed: {sentence(str(error))} The previous results are kept.",
                image_step=None if video else error.step,
                frame_step=error.step if video else None,
            )
        except RunCancelled:
            return RunResult("Cancelled. The previous results are kept.")
        except (ValueError, OSError) as error:
            return RunResult(
                f"⚠️ Not reconstructed: {sentence(without_paths(str(error)))} The previous results are kept."
            )
        finally:
            self._runs.pop(session, None)
        self.scratch.trim()
        depth = scene.arrays.depth
        previews = [(colourise_depth(view_depth), f"{name}: depth") for view_depth, name in zip(depth, scene.names)]
        return RunResult(f"Reconstructed {len(scene.names)} views.", scene=scene, depth_previews=previews)

    def _run(self, views: Views, cancelled: threading.Event) -> Scene:
        inputs = self.processor(geometry_images=views.images, return_tensors="pt", resize_views_to_first=True)
        inputs = inputs.to(self.device)
        self._running = (threading.get_ident(), cancelled)
        try:
            with torch.inference_mode():
                output = self.model.reconstruct(**inputs)
        finally:
            self._running = None
        if cancelled.is_set():
            raise RunCancelled("cancelled")
        arrays = check_reconstruction(output, inputs["geometry_pixel_values"], self.processor.geometry_image_processor)
        note = views.resized_note()
        if views.skipped:
            note += " ⚠️ Skipped: " + sentence("; ".join(views.skipped))
        return Scene(self.scratch.new_folder(), views.images, views.names, arrays, note=note)

    # ----------------------------------------------------------------------------------------------------- drawing

    def shown(self, scene: Scene, display: Display) -> Shown:
        """The points, colours and cameras that `display` shows of `scene` (filters first, then the cap)."""
        arrays = scene.arrays
        colours = arrays.images
        if display.colouring == "view":
            colours = np.broadcast_to(view_colours(len(colours))[:, None, None], colours.shape)
        points, point_colours, passing = select_points(
            arrays.world_points, colours, arrays.depth, arrays.confidence, display.selection(self.has_confidence),
            images=arrays.images,
        )  # fmt: skip
        palette = view_colours(len(scene.names))
        poses = arrays.camera_poses
        if display.one_view is not None:
            poses, palette = poses[[display.one_view]], palette[[display.one_view]]
        low, high = percentile_box(points, FRAMING_PERCENTILE)
        size = cone_size(poses[:, :3, 3], float(np.linalg.norm(high - low)))
        total = int(np.isfinite(arrays.world_points).all(axis=-1).sum())
        return Shown(points, point_colours, poses, size, palette, passing, total)

    def draw(self, scene: Scene, display: Display) -> tuple[dict, str]:
        """The viewer's data (`viewer_data`) and the status line: how many points pass the filters and how many are
        shown."""
        shown = self.shown(scene, display)
        view = viewer_data(scene.folder.name, shown, scene.arrays.image_size, bool(display.show_cameras))
        drawn = len(shown.points)
        counts = f"{shown.passing:,} of {shown.total:,} points pass the filters"
        if drawn < shown.passing:
            counts += f"; {drawn:,} of them are shown (raise 'At most N points' to see more)"
        else:
            counts += "; all are shown"
        return view, f"Reconstructed {len(scene.names)} views: {counts}.{scene.note}"

    def redraw(self, scene: Scene | None, *display_values: Any) -> tuple:
        """Display options changed (or a run ended): redraw the kept scene from the settings as they are now.
        Returns the viewer's data, the status and the downloads (the full files if written: "shown" files written
        earlier no longer match the picture)."""
        if scene is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            view, status = self.draw(scene, Display(*display_values))
        except ValueError as error:
            gr.Warning(without_paths(str(error)))
            return gr.skip(), gr.skip(), gr.skip()
        return view, status, scene.full_files or None

    # --------------------------------------------------------------------------------------------------- downloads

    def shown_downloads(self, scene: Scene | None, *display_values: Any) -> list[str] | None:
        """Write what the view shows now (`shown_scene.glb`, `shown_points.ply`, in the model's frame) and return
        them with the full files if those were written."""
        if scene is None:
            gr.Warning("Reconstruct a scene first.")
            return None
        display = Display(*display_values)
        shown = self.shown(scene, display)
        folder = scene.folder / "shown"
        shutil.rmtree(folder, ignore_errors=True)  # the previous "shown" files: one set per scene
        folder.mkdir(parents=True)
        frustum_scale = shown.cone_size / robust_scene_scale(shown.points, shown.poses)
        colour = None if display.one_view is None else tuple(int(c) for c in shown.camera_colours[0])
        glb = save_scene_glb(
            folder / "shown_scene.glb", shown.points, shown.colours, shown.poses, image_size=scene.arrays.image_size,
            show_cameras=bool(display.show_cameras), frustum_scale=frustum_scale, frustum_colour=colour,
        )  # fmt: skip
        ply = save_point_cloud_ply(folder / "shown_points.ply", shown.points, shown.colours)
        self.scratch.trim()
        return [str(glb), str(ply), *scene.full_files]

    def full_downloads(self, scene: Scene | None, progress: gr.Progress | None = None) -> list[str] | None:
        """Write (once per scene) the unfiltered result: `full_scene.glb`, `full_points.ply`, `cameras.json` and a
        zipped COLMAP model (when the views look like pinhole cameras)."""
        if scene is None:
            gr.Warning("Reconstruct a scene first.")
            return None
        if not scene.full_files:
            if progress is not None:
                progress(0.1, desc="Writing every point")
            folder = scene.folder / "full"
            written = write_scene(
                folder,
                scene.arrays,
                original_sizes=[(view.height, view.width) for view in scene.views],
                view_names=scene.names,
            )
            names = {"scene.glb": "full_scene.glb", "points.ply": "full_points.ply", "cameras.json": "cameras.json"}
            files = [str(path.rename(folder / names[path.name])) for path in written
                     if path.name in names and path.parent == folder]  # fmt: skip
            try:
                image_names = [f"view_{index:03d}.png" for index in range(len(scene.views))]
                write_colmap(folder / "colmap", scene.arrays, image_names=image_names)
                files.append(shutil.make_archive(str(folder / "full_colmap"), "zip", folder / "colmap"))
            except ValueError as error:  # e.g. no view looks like a pinhole camera: the rest is still useful
                gr.Info(f"No COLMAP model: {without_paths(str(error))}")
            scene.full_files = files
            self.scratch.trim()
        return list(scene.full_files)

    def forget(self, scene: Scene | None) -> None:
        """A session's scene expired (its page went away): remove its files."""
        if scene is not None:
            shutil.rmtree(scene.folder, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------------- measure

    @staticmethod
    def _zoom(scene: Scene) -> int:
        """Whole-pixel zoom of the measuring image: small geometry views are enlarged to about 512 pixels wide (the
        page shows an image at most at its own size, so a small one would be a small target)."""
        return max(1, math.ceil(MEASURE_WIDTH / scene.arrays.images.shape[2]))

    def measure_image(self, scene: Scene | None, view: str | None, picks: list | None) -> np.ndarray | None:
        """View `view` at the geometry resolution (zoomed, see `_zoom`), with the picked points of that view marked
        (A red, B blue)."""
        if scene is None or view in (None, ""):
            return None
        zoom = self._zoom(scene)
        image = Image.fromarray(scene.arrays.images[int(view)])
        image = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        radius = 8
        for (picked_view, x, y), colour in zip(picks or [], ((255, 40, 40), (40, 120, 255))):
            if picked_view == int(view):
                centre_x, centre_y = (x + 0.5) * zoom, (y + 0.5) * zoom
                box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
                draw.ellipse(box, outline=colour, width=3)
        return np.asarray(image)

    def measure(self, scene: Scene | None, view: str | None, picks: list | None, event: gr.SelectData) -> tuple:
        """A click on the measuring image: the first click sets A, the second B (a third starts again). Returns the
        marked image, the picks and the distance line."""
        if scene is None or view in (None, ""):
            gr.Warning("Reconstruct a scene first.")
            return gr.skip(), gr.skip(), gr.skip()
        zoom = self._zoom(scene)
        limits = scene.arrays.images.shape[2:0:-1]
        x, y = (min(int(value) // zoom, limit - 1) for value, limit in zip(event.index, limits))
        picks = [*(picks or []), (int(view), x, y)] if len(picks or []) < 2 else [(int(view), x, y)]
        return self.measure_image(scene, view, picks), picks, self.distance_text(scene, picks)

    @staticmethod
    def distance_text(scene: Scene, picks: list) -> str:
        """The picked points and, with two, their distance in scene units."""
        labels = []
        points = []
        for letter, (view, x, y) in zip("AB", picks):
            points.append(scene.arrays.world_points[view, y, x])
            labels.append(f"{letter}: {scene.names[view]} ({x}, {y})")
        text = ", ".join(labels)
        if len(points) < 2:
            return text + ". Click a second point (on this or another view)."
        if not np.isfinite(points).all():
            return text + ": no 3D point there; pick another pixel."
        return f"{text}: **distance {float(np.linalg.norm(points[0] - points[1])):.4g} scene units**."

    # ------------------------------------------------------------------------------------------------------- chat

    def answer(self, files: Sequence | None, question: str, video: str | None = None, every: int = 10) -> str:
        """Answer `question` about the views (each used as a geometry view and a semantic image)."""
        views = self.read_views(files, video, every)
        return answer(self.model, self.processor, views.images, question, self.max_new_tokens)

    def ask(
        self,
        scene: Scene | None,
        files: Sequence | None,
        question: str,
        history: list | None,
        video: str | None = None,
        every: float = 10,
        step: float = 1,
    ) -> Iterator[tuple]:
        """Chat handler: answers about the reconstructed scene's views (else the uploaded ones), streaming the answer
        into the history; then names the views it used under the answer and shows them. Clears the text box. A
        question without views (or without text) gets one warning and changes nothing."""
        if not question or not question.strip():
            gr.Warning("Type a question about the views.")
            yield gr.skip(), gr.skip(), gr.skip()
            return
        if scene is not None:
            images, names = scene.views, scene.names
        else:
            try:
                views = self.read_views(files, video, int(every), int(step))
            except ValueError as error:
                gr.Warning(without_paths(str(error)))
                yield gr.skip(), gr.skip(), gr.skip()
                return
            images, names = views.images, views.names
        used = [(np.asarray(image.convert("RGB")), name) for image, name in zip(images, names)]
        history = [*(history or []), {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def generate() -> None:
            try:
                result["answer"] = answer(self.model, self.processor, images, question, self.max_new_tokens, streamer)
            except Exception as error:  # handed to the page below, after the stream ends
                result["error"] = error
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            history[-1] = {"role": "assistant", "content": text}
            yield history, "", used
        thread.join()
        if "error" in result:
            gr.Warning(without_paths(f"The model could not answer: {result['error']}"))
            yield history[:-2], question, gr.skip()
            return
        history[-1] = {"role": "assistant", "content": f"{result['answer']}\n\n*Views used: {', '.join(names)}*"}
        yield history, "", used


# ------------------------------------------------------------------------------------------------------ the page


@dataclass
class Inputs:
    files: gr.File
    step: gr.Slider
    video: gr.Video
    every: gr.Slider
    note: gr.Markdown
    run: gr.Button
    cancel: gr.Button
    clear: gr.Button
    status: gr.Markdown
    examples: gr.Gallery

    @property
    def source(self) -> list:
        return [self.files, self.video, self.every, self.step]


@dataclass
class Results:
    viewer: gr.HTML
    gallery: gr.Gallery
    depth: gr.Gallery
    measure_view: gr.Dropdown
    measure_image: gr.Image
    measure_text: gr.Markdown
    display: list
    view_choice: gr.Dropdown
    show_cameras: gr.Checkbox
    downloads: gr.File
    download_shown: gr.Button
    download_full: gr.Button


@dataclass
class Chat:
    chat: gr.Chatbot
    question: gr.Textbox
    ask: gr.Button
    used: gr.Gallery


def build_inputs() -> Inputs:
    """The left column: images or a video, the Reconstruct / Cancel / Clear buttons, the status and the examples."""
    with gr.Tab("Images"):
        files = gr.File(
            label="Views of one scene", file_count="multiple", file_types=["image"], type="filepath",
            elem_id="views-input", height=150,
        )  # fmt: skip
        step = gr.Slider(1, 50, value=1, step=1, label="Use every k-th image", elem_id="image-step")
    with gr.Tab("Video"):
        video = gr.Video(label="Video of the scene", sources=["upload"], height=150, elem_id="video-input")
        every = gr.Slider(1, 60, value=10, step=1, label="Use every N-th frame", elem_id="video-every")
    note = gr.Markdown(elem_id="input-note")
    with gr.Row():
        run = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button", scale=2, min_width=120)
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-button", scale=2, min_width=120, visible=False)
        clear = gr.Button("Clear", elem_id="clear-button", scale=1, min_width=60)
    status = gr.Markdown(elem_id="status")
    scenes = example_scenes()
    examples = gr.Gallery(
        value=[(paths[0], label) for label, paths in scenes], label="Example scenes: click one to reconstruct it",
        columns=2, height=150, allow_preview=False, object_fit="cover", elem_id="example-gallery", interactive=False,
    )  # fmt: skip
    return Inputs(files, step, video, every, note, run, cancel, clear, status, examples)


def build_results(demo: G2VLMDemo) -> Results:
    """The middle column: the 3D view (and input, depth, measure tabs), the display controls and the downloads."""
    with gr.Tabs(elem_id="result-tabs"):
        with gr.Tab("3D scene"):
            viewer = gr.HTML(
                None, html_template=VIEWER_HTML, js_on_load=VIEWER_JS, apply_default_css=False,
                elem_id="scene-viewer", label="Scene (points + cameras)",
            )  # fmt: skip
        with gr.Tab("Input views"):
            gallery = gr.Gallery(
                label="Input views", columns=5, height=320, elem_id="input-gallery", object_fit="contain"
            )
        with gr.Tab("Depth"):
            depth = gr.Gallery(label="Depth per view (light = near)", columns=4, height=320, elem_id="depth-gallery")
        with gr.Tab("Measure"):
            with gr.Row(equal_height=True):
                measure_view = gr.Dropdown([], label="View", elem_id="measure-view", scale=1, min_width=120)
                measure_text = gr.Markdown(
                    "Click two pixels (on one view or two): their 3D distance, in scene units.",
                    elem_id="measure-text",
                )
            measure_image = gr.Image(label="Click to measure", interactive=False, elem_id="measure-image", height=230)
    with gr.Group(elem_id="display"):  # redraws the kept scene, without the model
        confidence = gr.Slider(
            0, 95, value=10 if demo.has_confidence else 0, step=5, visible=demo.has_confidence,
            label="Hide the least confident points (percentile)", elem_id="confidence",
        )  # fmt: skip
        with gr.Row():
            outliers = gr.Slider(0, 20, value=2, step=0.5, label="Hide outliers (%)", elem_id="outliers")
            edges = gr.Slider(0, 0.5, value=0, step=0.01, label="Hide depth edges", elem_id="edges")
        with gr.Row(equal_height=True):
            max_points = gr.Slider(
                1_000, 1_000_000, value=demo.max_points, step=1_000, label="At most N points", elem_id="max-points",
                scale=2,
            )  # fmt: skip
            view_choice = gr.Dropdown(
                [("All views", ALL_VIEWS)], value=ALL_VIEWS, label="Points of", elem_id="view-choice", min_width=110
            )
            colouring = gr.Dropdown(
                ["image", "view"], value="image", label="Colour by", elem_id="colouring", min_width=100
            )
        with gr.Row(equal_height=True):
            black = gr.Checkbox(value=False, label="Hide black", elem_id="drop-black", min_width=80)
            white = gr.Checkbox(value=False, label="Hide white", elem_id="drop-white", min_width=80)
            show_cameras = gr.Checkbox(value=True, label="Cameras", elem_id="show-cameras", min_width=80)
    with gr.Row():
        download_shown = gr.Button("Download what is shown", size="sm", elem_id="download-shown")
        download_full = gr.Button("Download everything", size="sm", elem_id="download-full")
    downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads", height=110)
    display = [confidence, outliers, edges, black, white, view_choice, max_points, show_cameras, colouring]
    return Results(
        viewer, gallery, depth, measure_view, measure_image, measure_text, display, view_choice, show_cameras,
        downloads, download_shown, download_full,
    )  # fmt: skip


def build_chat() -> Chat:
    """The right column: the spatial questions and the views the answer used."""
    gr.Markdown("**Spatial questions about this scene**")
    chat = gr.Chatbot(show_label=False, elem_id="chat", height=330)
    question = gr.Textbox(
        show_label=False, placeholder="How far is the chair from the door?", elem_id="question", lines=1
    )
    ask = gr.Button("Ask", elem_id="ask-button")
    used = gr.Gallery(
        label="Views the answer used", columns=4, height=150, allow_preview=False, object_fit="cover",
        elem_id="used-views",
    )  # fmt: skip
    return Chat(chat, question, ask, used)


def wire_inputs(demo: G2VLMDemo, inputs: Inputs, results: Results) -> None:
    """Images and a video never both stand (the newer clears the other); the preview says what would run."""
    inputs.files.change(lambda paths: None if paths else gr.skip(), inputs.files, inputs.video, api_name=False,
                        queue=False)  # fmt: skip
    inputs.video.change(lambda path: None if path else gr.skip(), inputs.video, inputs.files, api_name=False,
                        queue=False)  # fmt: skip
    for control in inputs.source:
        control.change(
            demo.preview, inputs.source, [results.gallery, inputs.note], api_name=False,
            trigger_mode="always_last", show_progress="hidden",
        )  # fmt: skip


def wire_run(demo: G2VLMDemo, inputs: Inputs, results: Results, scene_state: gr.State, app: gr.Blocks) -> None:
    """Reconstruct (and the example gallery): lock the inputs, run (one at a time, queued, cancellable), then draw
    the result from the display settings as they are then."""
    locked = [inputs.files, inputs.video, inputs.every, inputs.step, inputs.clear]

    def lock(busy: bool) -> Callable[[], dict]:
        def update() -> dict:
            changes = {component: gr.update(interactive=not busy) for component in locked}
            return {**changes, inputs.run: gr.update(visible=not busy), inputs.cancel: gr.update(visible=busy)}

        return update

    def run(
        files: Any,
        video: Any,
        every: float,
        step: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (how Gradio asks for a progress bar)
    ) -> dict:
        result = demo.reconstruct(files, video, every, step, request, progress)
        outputs: dict = {inputs.status: result.status}
        if result.image_step is not None:
            outputs[inputs.step] = result.image_step
        if result.frame_step is not None:
            outputs[inputs.every] = result.frame_step
        if result.scene is not None:
            names = result.scene.names
            outputs[scene_state] = result.scene
            outputs[results.depth] = result.depth_previews
            outputs[results.downloads] = None
            outputs[results.view_choice] = gr.update(
                choices=[("All views", ALL_VIEWS), *[(name, str(index)) for index, name in enumerate(names)]],
                value=ALL_VIEWS,
            )
            outputs[results.measure_view] = gr.update(
                choices=[(name, str(index)) for index, name in enumerate(names)], value="0"
            )
        return outputs

    run_outputs = [inputs.status, inputs.step, inputs.every, scene_state, results.depth, results.downloads,
                   results.view_choice, results.measure_view]  # fmt: skip
    lock_outputs = [*locked, inputs.run, inputs.cancel]
    redraw = [scene_state, *results.display]

    def start(trigger: Any, api_name: str | bool) -> Any:
        running = trigger.then(
            run, inputs.source, run_outputs, api_name=api_name, concurrency_limit=1, concurrency_id="reconstruct",
            show_progress="full", show_progress_on=[inputs.status],
        )  # fmt: skip
        running.then(lock(False), None, lock_outputs, api_name=False, queue=False).then(
            demo.redraw, redraw, [results.viewer, inputs.status, results.downloads], api_name=False,
            show_progress="hidden",
        )  # fmt: skip
        return running

    clicked = start(inputs.run.click(lock(True), None, lock_outputs, api_name=False, queue=False), "reconstruct")

    def pick_example(event: gr.SelectData) -> list[str]:
        return example_scenes()[event.index][1]

    chosen = inputs.examples.select(pick_example, None, inputs.files, api_name=False, queue=False)
    example_run = start(chosen.then(lock(True), None, lock_outputs, api_name=False, queue=False), False)
    inputs.cancel.click(demo.cancel, None, None, cancels=[clicked, example_run], api_name=False, queue=False).then(
        lock(False), None, lock_outputs, api_name=False, queue=False
    ).then(lambda: "Cancelled. The previous results are kept.", None, inputs.status, api_name=False, queue=False)
    app.unload(demo.cancel)


def wire_display(demo: G2VLMDemo, inputs: Inputs, results: Results, scene_state: gr.State) -> None:
    """The display controls redraw the kept scene (no veil over the view); the download buttons write files."""
    redraw_inputs = [scene_state, *results.display]
    for control in results.display:
        control.change(
            demo.redraw, redraw_inputs, [results.viewer, inputs.status, results.downloads],
            api_name="redraw" if control is results.show_cameras else False, trigger_mode="always_last",
            show_progress="hidden",
        )  # fmt: skip
    results.download_shown.click(
        demo.shown_downloads, redraw_inputs, results.downloads, api_name="download_shown", show_progress="minimal"
    )
    results.download_full.click(
        demo.full_downloads, scene_state, results.downloads, api_name="download_full", concurrency_id="reconstruct",
        show_progress="minimal",
    )  # fmt: skip


def wire_measure_and_chat(
    demo: G2VLMDemo, inputs: Inputs, results: Results, chat: Chat, scene_state: gr.State, picks: gr.State
) -> None:
    results.measure_view.change(
        demo.measure_image, [scene_state, results.measure_view, picks], results.measure_image, api_name=False,
        show_progress="hidden",
    )  # fmt: skip
    results.measure_image.select(
        demo.measure, [scene_state, results.measure_view, picks],
        [results.measure_image, picks, results.measure_text], api_name=False, show_progress="hidden",
    )  # fmt: skip
    ask_inputs = [scene_state, inputs.files, chat.question, chat.chat, inputs.video, inputs.every, inputs.step]
    for trigger, name in ((chat.ask.click, "ask"), (chat.question.submit, False)):
        trigger(demo.ask, ask_inputs, [chat.chat, chat.question, chat.used], api_name=name, show_progress="minimal")


def build_demo(demo: G2VLMDemo) -> gr.Blocks:
    """The Gradio app (one reconstruction at a time, the others queued). Page events only; `/redraw` and `/ask`
    are also API names."""
    with gr.Blocks(
        title="G²VLM: 3D reconstruction and spatial reasoning", delete_cache=(600, 3600), fill_width=True
    ) as app:
        gr.HTML(HEADER)
        scene_state = gr.State(None, delete_callback=demo.forget)
        picks = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                inputs = build_inputs()
            with gr.Column(scale=2):
                results = build_results(demo)
            with gr.Column(scale=1, min_width=280):
                chat = build_chat()
        wire_inputs(demo, inputs, results)
        wire_run(demo, inputs, results, scene_state, app)
        wire_display(demo, inputs, results, scene_state)
        wire_measure_and_chat(demo, inputs, results, chat, scene_state, picks)
        cleared = [inputs.files, inputs.video, results.gallery, inputs.note, results.viewer, scene_state,
                   results.depth, results.downloads, inputs.status, chat.chat, results.measure_image, picks]  # fmt: skip
        inputs.clear.click(
            lambda: (None, None, [], "", None, None, [], None, "", [], None, []), None, cleared, api_name=False,
            queue=False,
        )  # fmt: skip
    app.queue(default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, demo: G2VLMDemo, **options: Any) -> Any:
    """Launch with the upload size limit (gradio refuses larger uploads before they reach the demo), the theme and
    the page's style."""
    return app.launch(max_file_size=int(demo.max_file_mb * 1e6), css=CSS, theme=THEME, **options)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="G2VLM Gradio demo")
    parser.add_argument("--model", default=DEFAULT_MODEL, required=not DEFAULT_MODEL, help="Hub id or converted folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME (a Space sets 0.0.0.0) or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, help="largest accepted upload, in MB")
    parser.add_argument("--scratch-cap-mb", type=float, default=SCRATCH_CAP_MB, help="most scratch space, in MB")
    parser.add_argument(
        "--memory-gb", type=float, default=None, help="memory a run may use (default: 80%% of what is free)"
    )
    parser.add_argument(
        "--cost-scale", type=float, default=1.0,
        help="the memory/time estimate relative to the tiny test model (see demo/benchmark_memory.py)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    demo = G2VLMDemo(
        args.model, device=args.device, max_file_mb=args.max_file_mb, scratch_cap_mb=args.scratch_cap_mb,
        memory_budget_gb=args.memory_gb, costs=CostModel(scale=args.cost_scale),
    )  # fmt: skip

    # SIGTERM (docker stop, a Space restart) ends the process like Ctrl+C: through `finally`, removing the scratch
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        launch(build_demo(demo), demo, server_name=args.host, server_port=args.port)
    finally:
        demo.close()


if __name__ == "__main__":
    main()
