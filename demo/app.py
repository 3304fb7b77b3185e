"""G²VLM demo: upload views (or a video) of one scene, see it in 3D with its cameras and depth, measure it, ask
spatial questions.

    pip install "g2vlm-hf[demo]"
    python demo/app.py --model user/g2vlm-2b          # a Hub id or a converted folder (or set G2VLM_MODEL)

As a Hugging Face Space: this file as `app.py`, `requirements.txt` naming g2vlm-hf[demo], and the `G2VLM_MODEL`
variable set to the model repository.

What it does: the views are reconstructed once (`model.reconstruct`); the 3D view (coloured points + one camera frustum
per view, in that view's colour, drawn by the small WebGL viewer in `point_viewer.js`) is redrawn from the kept
reconstruction whenever a display control changes, keeping the viewpoint (a new reconstruction frames the scene
anew); two points clicked in it give their distance: the filters (outliers outside a percentile box, depth edges, black/white background, points of one view, confidence where
the checkpoint has a confidence head), the number of points, the cameras and the colouring. The "shown" downloads are
exactly the drawn points and cameras (in the model's frame); the "full" ones hold every point. The Measure tab gives
the distance between two clicked pixels; the chat answers with the views' geometry in the model's context, streamed,
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from packaging.version import Version
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

import g2vlm_hf  # noqa: F401  (registers G2VLM with the Auto classes)
from g2vlm_hf.chat import answer
from g2vlm_hf.export import (
    check_scene,
    colourise_depth,
    robust_scene_scale,
    save_point_cloud_ply,
    save_scene_glb,
    view_colours,
    write_colmap,
    write_scene,
)
from g2vlm_hf.inputs import InputError as CLIError
from g2vlm_hf.inputs import video_frames
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
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_MB = 100.0
# The model's world frame is the first camera's OpenCV frame (y down, z forward); the viewer is y-up, so the scene it
# shows is turned half a turn about x. Downloads keep the model's frame.
VIEWER_FROM_WORLD = np.diag([1.0, -1.0, -1.0, 1.0])
# frustum depth as a fraction of the diagonal of the shown points' box: visible at any view count and scene size
FRUSTUM_FRACTION = 0.06
# a new scene is framed on the per-axis [p, 100-p] percentile box of its shown points: far outliers do not shrink it
FRAMING_PERCENTILE = 2.0
VIEWER_JS = (Path(__file__).resolve().parent / "point_viewer.js").read_text(encoding="utf-8")
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
</div>
"""
MEASURE_WIDTH = 512  # small views are enlarged to about this width for clicking
ALL_VIEWS = "all"
# an absolute path in a message (e.g. the server's upload folder): shown as its last part only
ABSOLUTE_PATH = re.compile(r"(?:/[^/\s'\"():]+)+/([^/\s'\"():]+)")
CSS = """
#scene-viewer .html-container {padding: 0}
#scene-viewer .point-viewer {position: relative; height: 340px; border-radius: 6px; overflow: hidden}
#scene-viewer canvas {display: block; width: 100%; height: 100%; cursor: grab; touch-action: none}
#scene-viewer .point-tools {position: absolute; top: 6px; left: 6px; display: flex; gap: 8px; align-items: center;
  color: #ddd; font-size: 12px; background: rgba(0, 0, 0, 0.45); padding: 3px 6px; border-radius: 4px}
#scene-viewer .point-tools button {color: #eee; border: 1px solid #888; border-radius: 4px; padding: 1px 6px}
#scene-viewer .point-tools input {width: 90px; vertical-align: middle}
#scene-viewer .point-help {position: absolute; bottom: 4px; right: 8px; color: #aaa; font-size: 11px}
#scene-viewer .point-readout {position: absolute; top: 8px; right: 8px; color: #fff; font-size: 13px;
  background: rgba(0, 0, 0, 0.45); padding: 0 6px; border-radius: 4px}
#scene-viewer .point-readout:empty {display: none}
#views-input .file-preview-holder {max-height: 7.5em; overflow-y: auto}
"""


def ordinal(number: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _paths(files: Sequence | None) -> list[str]:
    """File paths from what gr.File gives (paths, or objects with a `.name`)."""
    return [str(getattr(item, "name", item)) for item in files or []]


def without_paths(message: str) -> str:
    """`message` with every absolute path cut to its file name: the server's folders are nobody's business."""
    return ABSOLUTE_PATH.sub(r"\1", message)


def readable_errors(handler: Callable) -> Callable:
    """Shows a failing handler's problem as a readable message in the page (gr.Error) instead of a bare 'Error'."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except (CLIError, ValueError, OSError) as error:
            raise gr.Error(without_paths(str(error))) from error

    wrapper.__name__, wrapper.__doc__ = handler.__name__, handler.__doc__
    return wrapper


def readable_errors_stream(handler: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """`readable_errors` for a streaming (generator) handler."""

    def wrapper(*args: Any, **kwargs: Any) -> Iterator:
        try:
            yield from handler(*args, **kwargs)
        except gr.Error:
            raise
        except (CLIError, ValueError, OSError) as error:
            raise gr.Error(without_paths(str(error))) from error

    wrapper.__name__, wrapper.__doc__ = handler.__name__, handler.__doc__
    return wrapper


def example_scenes() -> tuple[list[list[list[str]]], list[str]]:
    """The bundled example scenes (one folder of views each, rendered with exact geometry by
    `g2vlm_hf.training.render_room`), as gr.Examples rows and their labels."""
    folders = [folder for folder in sorted(EXAMPLES_DIR.iterdir()) if folder.is_dir()]
    rows = [[sorted(str(path) for path in folder.glob("*.png"))] for folder in folders]
    labels = [f"{folder.name.replace('_', ', ')} ({len(row[0])} views)" for folder, row in zip(folders, rows)]
    return rows, labels


def frustum_lines(poses: np.ndarray, size: float, image_size: Sequence[int]) -> np.ndarray:
    """`(V * 16, 3)` float32 line-segment ends (8 edges per camera: apex to the 4 base corners, and the base) of the
    cameras' frustums, `size` deep, in the viewer's frame."""
    height, width = image_size
    half_h = 0.5 * size
    half_w = half_h * width / height
    corners = np.array(
        [[-half_w, -half_h, size], [half_w, -half_h, size], [half_w, half_h, size], [-half_w, half_h, size]]
    )
    ends = [end for corner in corners for end in (np.zeros(3), corner)]
    ends += [end for index in range(4) for end in (corners[index], corners[(index + 1) % 4])]
    local = np.concatenate([np.array(ends), np.ones((len(ends), 1))], axis=1)  # homogeneous, camera frame
    world = np.einsum("vij,ej->vei", VIEWER_FROM_WORLD @ poses, local)[..., :3]
    return world.reshape(-1, 3).astype(np.float32)


def _base64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def viewer_data(
    scene_id: str, points: np.ndarray, colours: np.ndarray, lines: np.ndarray, line_colours: np.ndarray
) -> dict[str, Any]:
    """The value of the 3D viewer: the points turned y-up (little-endian float32 xyz, base64) with their uint8 RGB
    colours, the camera frustums as line-segment ends with their colours, the robust box a new scene is framed on,
    and the scene's id (a new id resets the viewpoint; a redraw of the same scene keeps it)."""
    viewer_points = (points @ VIEWER_FROM_WORLD[:3, :3].T).astype("<f4")
    low, high = percentile_box(viewer_points, FRAMING_PERCENTILE)
    return {
        "scene": scene_id,
        "count": len(viewer_points),
        "positions": _base64(viewer_points),
        "colours": _base64(colours.astype(np.uint8)),
        "lines": _base64(lines.astype("<f4")),
        "line_colours": _base64(line_colours),
        "box": [low.tolist(), high.tolist()],
    }


def decode_viewer_points(view: dict[str, Any]) -> np.ndarray:
    """The `(M, 3)` points of a viewer value (in the viewer's y-up frame)."""
    return np.frombuffer(base64.b64decode(view["positions"]), dtype="<f4").reshape(-1, 3)


class TooManyViews(ValueError):
    """More views than the model takes; `step` is the smallest 'every k-th' that fits."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class Views:
    """The views of one request, their names, and what was skipped (one line per skipped file)."""

    images: list[Image.Image]
    names: list[str]
    skipped: list[str] = field(default_factory=list)


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

    def selection(self, has_confidence: bool) -> PointSelection:
        return PointSelection(
            outlier_percentile=float(self.outliers),
            depth_edge_jump=float(self.depth_edges),
            drop_black=bool(self.drop_black),
            drop_white=bool(self.drop_white),
            views=None if self.view in (ALL_VIEWS, None, "") else [int(self.view)],
            confidence_percentile=float(self.confidence) if has_confidence else 0.0,
            max_points=max(1, int(self.max_points)),
        )


@dataclass
class Scene:
    """One reconstruction, kept per browser session so that the 3D view can be redrawn without the model."""

    folder: Path
    views: list[Image.Image]
    names: list[str]
    camera_poses: np.ndarray
    world_points: np.ndarray
    depth: np.ndarray
    confidence: np.ndarray | None
    intrinsics: np.ndarray
    images: np.ndarray
    full_files: list[str] = field(default_factory=list)
    note: str = ""


class G2VLMDemo:
    """The model behind the demo: reconstruction to GLB/PLY/COLMAP, filtered views, measuring and spatial chat."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        max_new_tokens: int = 128,
        max_points: int = 200_000,
        max_file_mb: float = MAX_FILE_MB,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype="auto").to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.max_new_tokens = max_new_tokens
        self.max_points = max_points
        self.max_file_mb = max_file_mb
        self.has_confidence = bool(getattr(self.model.config, "use_confidence_head", False))
        # one folder per request inside one scratch folder, removed with the demo (Gradio copies what it serves)
        self.scratch = tempfile.TemporaryDirectory(prefix="g2vlm-demo-")

    def close(self) -> None:
        """Remove the scenes written so far."""
        self.scratch.cleanup()

    @property
    def max_views(self) -> int:
        return self.processor.geometry_image_processor.max_views

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
                    problem = without_paths(str(error))
            views.skipped.append(problem)
        if not views.images:
            raise ValueError(f"None of the {len(chosen)} files can be used: " + "; ".join(views.skipped))
        return views

    def _video_views(self, video: str, every: int) -> Views:
        problem = self._too_large(video)
        if problem is not None:
            raise ValueError(problem)
        frames = video_frames(Path(video), every, max_frames=self.max_views + 1)
        if len(frames) > self.max_views:
            raise TooManyViews(
                f"More than {self.max_views} frames at every {ordinal(every)} frame, but this model takes at most "
                f"{self.max_views} at once: use a larger frame interval (set below).",
                every * 2,
            )
        return Views(frames, [f"frame {index * every}" for index in range(len(frames))])

    def preview(self, files: Sequence | None, video: str | None, every: float, step: float) -> tuple[list, str]:
        """The input gallery and a summary line: how many views a Reconstruct would use, and what it would skip."""
        if not _paths(files) and not video:
            return [], ""
        try:
            views = self.read_views(files, video, int(every), int(step))
        except (CLIError, ValueError) as error:
            return [], f"⚠️ {without_paths(str(error))}"
        kind = "frames" if video else "images"
        summary = f"**{len(views.images)} {kind}** will be reconstructed"
        if not video and int(step) > 1:
            summary += f" (every {ordinal(int(step))} of {len(_paths(files))})"
        if views.skipped:
            summary += ". ⚠️ Skipped: " + "; ".join(views.skipped)
        gallery = [(np.asarray(image), name) for image, name in zip(views.images, views.names)]
        return gallery, summary + "."

    # --------------------------------------------------------------------------------------------- reconstruction

    def reconstruct(
        self,
        files: Sequence | None,
        video: str | None,
        every: float,
        step: float,
        *display_values: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (how Gradio asks for a progress bar)
    ) -> tuple:
        """Reconstruct the views. Outputs: the viewer's data, the depth previews, the downloads, the kept scene, the
        status line, the 'points of view' and measuring view choices, and the image step. On failure only the status
        (and, for too many views, the step that fits) changes: the previous results stay."""
        try:
            progress(0.05, desc="Reading the views")
            views = self.read_views(files, video, int(every), int(step))
            progress(0.2, desc=f"Reconstructing {len(views.images)} views")
            scene = self._run(views)
        except TooManyViews as error:
            gr.Warning(str(error))
            step_update = gr.update() if video else gr.update(value=error.step)
            every_update = gr.update(value=error.step) if video else gr.update()
            return (*[gr.skip()] * 4, f"⚠️ Not reconstructed: {error} The previous results are kept.",
                    gr.skip(), gr.skip(), step_update, every_update)  # fmt: skip
        except (CLIError, ValueError, OSError) as error:
            message = without_paths(str(error))
            gr.Warning(message)
            return (*[gr.skip()] * 4, f"⚠️ Not reconstructed: {message} The previous results are kept.",
                    *[gr.skip()] * 4)  # fmt: skip
        progress(0.7, desc="Writing the scene files")
        scene.full_files, colmap_note = self.full_downloads(scene)
        scene.note += colmap_note
        progress(0.9, desc="Drawing the 3D view")
        view, shown, status = self.draw(scene, Display(*display_values))
        depth_previews = [(colourise_depth(depth), f"{name}: depth") for depth, name in zip(scene.depth, scene.names)]
        choices = [("All views", ALL_VIEWS), *[(name, str(index)) for index, name in enumerate(scene.names)]]
        measure_choices = [(name, str(index)) for index, name in enumerate(scene.names)]
        return (
            view,
            depth_previews,
            [*shown, *scene.full_files],
            scene,
            status,
            gr.update(choices=choices, value=ALL_VIEWS),
            gr.update(choices=measure_choices, value="0"),
            gr.update(),
            gr.update(),
        )

    def _run(self, views: Views) -> Scene:
        inputs = self.processor(geometry_images=views.images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            output = self.model.reconstruct(**inputs)
        images = self.processor.geometry_image_processor.unnormalize(inputs["geometry_pixel_values"][0].cpu()).numpy()
        confidence = None if output.confidence is None else output.confidence[0].float().cpu().numpy()
        note = f" ⚠️ Skipped: {'; '.join(views.skipped)}." if views.skipped else ""
        return Scene(
            folder=Path(tempfile.mkdtemp(prefix="scene-", dir=self.scratch.name)),
            views=views.images,
            names=views.names,
            camera_poses=output.camera_poses[0].float().cpu().numpy(),
            world_points=output.world_points[0].float().cpu().numpy(),
            depth=output.depth[0].float().cpu().numpy(),
            confidence=confidence,
            intrinsics=output.intrinsics[0].float().cpu().numpy(),
            images=images,
            note=note,
        )

    def full_downloads(self, scene: Scene) -> tuple[list[str], str]:
        """The unfiltered result (every finite point): `full_scene.glb`, `full_points.ply`, `cameras.json` and a
        zipped COLMAP model, and a note when no COLMAP model could be made."""
        folder = scene.folder / "full"
        checked = check_scene(  # once, for both exports
            scene.camera_poses,
            scene.world_points,
            scene.images,
            depth=scene.depth,
            confidence=scene.confidence,
            intrinsics=scene.intrinsics,
        )
        written = write_scene(folder, checked, original_sizes=[(view.height, view.width) for view in scene.views])
        names = {"scene.glb": "full_scene.glb", "points.ply": "full_points.ply", "cameras.json": "cameras.json"}
        files = []
        for path in written:
            if path.name in names and path.parent == folder:
                files.append(str(path.rename(folder / names[path.name])))
        note = ""
        try:
            write_colmap(
                folder / "colmap",
                checked,
                image_names=[f"view_{index:03d}.png" for index in range(len(scene.views))],
            )
            files.append(shutil.make_archive(str(folder / "full_colmap"), "zip", folder / "colmap"))
        except ValueError as error:  # e.g. no view looks like a pinhole camera: the rest is still useful
            note = f" No COLMAP model: {error}."
        return files, note

    def draw(self, scene: Scene, display: Display) -> tuple[dict, list[str], str]:
        """The viewer's data (`viewer_data`), the "shown" downloads (the same points, colours and cameras in the
        model's frame: `shown_scene.glb`, `shown_points.ply`) and the status line with the point count."""
        colours = scene.images
        if display.colouring == "view":
            colours = np.broadcast_to(view_colours(len(colours))[:, None, None], colours.shape)
        points, point_colours, kept = select_points(
            scene.world_points,
            colours,
            scene.depth,
            scene.confidence,
            display.selection(self.has_confidence),
            images=scene.images,
        )
        poses = scene.camera_poses
        if display.view not in (ALL_VIEWS, None, ""):
            poses = poses[[int(display.view)]]
        extent = float(np.linalg.norm(points.max(axis=0) - points.min(axis=0))) if len(points) > 1 else 1.0
        frustum_scale = FRUSTUM_FRACTION * (extent or 1.0) / robust_scene_scale(points, poses)
        palette = view_colours(len(scene.names))
        colour = None if display.view in (ALL_VIEWS, None, "") else tuple(int(c) for c in palette[int(display.view)])
        options = dict(
            image_size=scene.depth.shape[1:],
            show_cameras=bool(display.show_cameras),
            frustum_scale=frustum_scale,
            frustum_colour=colour,
        )
        folder = Path(tempfile.mkdtemp(prefix="shown-", dir=scene.folder))
        shown = [
            str(save_scene_glb(folder / "shown_scene.glb", points, point_colours, poses, **options)),
            str(save_point_cloud_ply(folder / "shown_points.ply", points, point_colours)),
        ]
        frustums = frustum_lines(poses, FRUSTUM_FRACTION * (extent or 1.0), scene.depth.shape[1:])
        frustum_colours = np.repeat(palette if colour is None else np.array([colour] * len(poses)), 16, axis=0)
        if not display.show_cameras:
            frustums, frustum_colours = frustums[:0], frustum_colours[:0]
        view = viewer_data(scene.folder.name, points, point_colours, frustums, frustum_colours.astype(np.uint8))
        total = int(np.isfinite(scene.world_points).all(axis=-1).sum())
        status = (
            f"Reconstructed {len(scene.names)} views. Showing {len(points):,} of {total:,} points"
            + (f" ({kept:,} pass the filters)" if kept != len(points) else "")
            + f".{scene.note}"
        )
        return view, shown, status

    def redraw(self, scene: Scene | None, *display_values: Any) -> tuple:
        """Display options changed: redraw the kept scene and rewrite the "shown" downloads (nothing to do before
        the first reconstruction)."""
        if scene is None:
            return gr.skip(), gr.skip(), gr.skip()
        view, shown, status = self.draw(scene, Display(*display_values))
        return view, [*shown, *scene.full_files], status

    # ---------------------------------------------------------------------------------------------------- measure

    @staticmethod
    def _zoom(scene: Scene) -> int:
        """Whole-pixel zoom of the measuring image: small geometry views are enlarged to about 512 pixels wide (the
        page shows an image at most at its own size, so a small one would be a small target)."""
        return max(1, math.ceil(MEASURE_WIDTH / scene.images.shape[2]))

    def measure_image(self, scene: Scene | None, view: str | None, picks: list | None) -> np.ndarray | None:
        """View `view` at the geometry resolution (zoomed, see `_zoom`), with the picked points of that view marked
        (A red, B blue)."""
        if scene is None or view in (None, ""):
            return None
        zoom = self._zoom(scene)
        image = Image.fromarray(scene.images[int(view)])
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
            raise gr.Error("Reconstruct a scene first.")
        zoom = self._zoom(scene)
        x, y = (min(int(value) // zoom, limit - 1) for value, limit in zip(event.index, scene.images.shape[2:0:-1]))
        picks = [*(picks or []), (int(view), x, y)] if len(picks or []) < 2 else [(int(view), x, y)]
        return self.measure_image(scene, view, picks), picks, self.distance_text(scene, picks)

    @staticmethod
    def distance_text(scene: Scene, picks: list) -> str:
        """The picked points and, with two, their distance in scene units."""
        labels = []
        points = []
        for letter, (view, x, y) in zip("AB", picks):
            point = scene.world_points[view, y, x]
            points.append(point)
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
    ) -> Iterator[tuple[list, str, list]]:
        """Chat handler: answers about the reconstructed scene's views (else the uploaded ones), streaming the answer
        into the history; then names the views it used under the answer and shows them. Clears the text box."""
        if not question or not question.strip():
            raise gr.Error("Type a question about the views.")
        if scene is not None:
            images, names = scene.views, scene.names
        else:
            views = self.read_views(files, video, int(every), int(step))
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
            raise gr.Error(without_paths(f"The model could not answer: {result['error']}"))
        history[-1] = {"role": "assistant", "content": f"{result['answer']}\n\n*Views used: {', '.join(names)}*"}
        yield history, "", used


def build_demo(demo: G2VLMDemo) -> gr.Blocks:
    """The Gradio app. API names: `/reconstruct`, `/redraw`, `/ask`, `/measure`."""
    with gr.Blocks(title="G²VLM: 3D reconstruction and spatial reasoning") as app:
        gr.Markdown(
            "**G²VLM**: upload views (or a video) of one scene, press **Reconstruct**, filter and download what "
            "you see, measure distances, ask spatial questions."
        )
        scene_state = gr.State(None)
        picks = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                with gr.Tab("Images"):
                    files = gr.File(
                        label="Views of one scene", file_count="multiple", file_types=["image"], type="filepath",
                        elem_id="views-input", height=120,
                    )  # fmt: skip
                    step = gr.Slider(1, 50, value=1, step=1, label="Use every k-th image", elem_id="image-step")
                with gr.Tab("Video"):
                    video = gr.Video(label="Video of the scene", sources=["upload"], height=150, elem_id="video-input")
                    every = gr.Slider(1, 60, value=10, step=1, label="Use every N-th frame", elem_id="video-every")
                input_note = gr.Markdown(elem_id="input-note")
                with gr.Row():
                    run = gr.Button(
                        "Reconstruct", variant="primary", elem_id="reconstruct-button", scale=2, min_width=120
                    )
                    clear = gr.Button("Clear", elem_id="clear-button", scale=1, min_width=60)
                status = gr.Markdown(elem_id="status")
                examples, labels = example_scenes()
                example_list = gr.Examples(
                    examples=examples, inputs=[files], example_labels=labels, label="Example scenes (click one)"
                )
            with gr.Column(scale=2):
                with gr.Tab("3D scene"):
                    viewer = gr.HTML(
                        None, html_template=VIEWER_HTML, js_on_load=VIEWER_JS, apply_default_css=False,
                        elem_id="scene-viewer", label="Scene (points + cameras)",
                    )  # fmt: skip
                with gr.Tab("Input views"):
                    inputs_gallery = gr.Gallery(
                        label="Input views", columns=5, height=340, elem_id="input-gallery", object_fit="contain"
                    )
                with gr.Tab("Depth"):
                    depth_gallery = gr.Gallery(
                        label="Depth per view (light = near)", columns=3, elem_id="depth-gallery"
                    )
                with gr.Tab("Measure"):
                    gr.Markdown("Click two pixels (on one view or two): their 3D distance, in scene units.")
                    measure_view = gr.Dropdown([], label="View", elem_id="measure-view")
                    measure_image = gr.Image(
                        label="Click to measure", interactive=False, elem_id="measure-image", height=360
                    )
                    measure_text = gr.Markdown(elem_id="measure-text")
                with gr.Group(elem_id="display"):  # redraws the kept scene, without the model
                    confidence = gr.Slider(
                        0, 95, value=10 if demo.has_confidence else 0, step=5, visible=demo.has_confidence,
                        label="Hide the least confident points (percentile)", elem_id="confidence",
                    )  # fmt: skip
                    with gr.Row():
                        outliers = gr.Slider(
                            0, 20, value=2, step=0.5, label="Hide outliers (percentile box)", elem_id="outliers"
                        )
                        edges = gr.Slider(
                            0, 0.5, value=0, step=0.01, label="Hide depth edges (0 = off)", elem_id="edges"
                        )
                    with gr.Row():
                        max_points = gr.Slider(
                            1_000, 1_000_000, value=demo.max_points, step=1_000, label="At most N points",
                            elem_id="max-points",
                        )  # fmt: skip
                        view_choice = gr.Dropdown(
                            [("All views", ALL_VIEWS)], value=ALL_VIEWS, label="Points of", elem_id="view-choice"
                        )
                    with gr.Row(equal_height=True):
                        colouring = gr.Dropdown(
                            ["image", "view"], value="image", label="Colour by", elem_id="colouring", min_width=120
                        )
                        black = gr.Checkbox(value=False, label="Hide black", elem_id="drop-black", min_width=80)
                        white = gr.Checkbox(value=False, label="Hide white", elem_id="drop-white", min_width=80)
                        show_cameras = gr.Checkbox(value=True, label="Cameras", elem_id="show-cameras", min_width=80)
                downloads = gr.File(
                    label="Downloads: shown_* = what the view shows; full_* / cameras.json / COLMAP = everything",
                    file_count="multiple", elem_id="downloads", height=140,
                )  # fmt: skip
            with gr.Column(scale=1, min_width=280):
                chat = gr.Chatbot(label="Spatial QA about this scene", elem_id="chat", height=360)
                question = gr.Textbox(
                    label="Question", placeholder="How far is the chair from the door?", elem_id="question"
                )
                ask = gr.Button("Ask", elem_id="ask-button")
                used_views = gr.Gallery(label="Views the answer used", columns=4, height=160)

        display = [confidence, outliers, edges, black, white, view_choice, max_points, show_cameras, colouring]
        source = [files, video, every, step]
        locked = [files, video, every, step, run, clear, example_list.dataset]

        def lock(busy: bool) -> Callable[[], tuple]:
            def update() -> tuple:
                label = "Reconstructing… (inputs locked)" if busy else "Reconstruct"
                return (*[gr.update(interactive=not busy)] * 4, gr.update(interactive=not busy, value=label),
                        gr.update(interactive=not busy), gr.update(visible=not busy))  # fmt: skip

            return update

        # images and a video never both stand: the newer upload clears the other, and the preview says what will run
        files.change(lambda paths: None if paths else gr.skip(), files, video, api_name=False, queue=False)
        video.change(lambda path: None if path else gr.skip(), video, files, api_name=False, queue=False)
        for control in (files, video, every, step):
            control.change(
                demo.preview, source, [inputs_gallery, input_note], api_name=False, trigger_mode="always_last"
            )
        run.click(lock(True), None, locked, api_name=False, queue=False).then(
            demo.reconstruct,
            inputs=[*source, *display],
            outputs=[viewer, depth_gallery, downloads, scene_state, status, view_choice, measure_view, step, every],
            api_name="reconstruct",
            concurrency_limit=1,
        ).then(lock(False), None, locked, api_name=False, queue=False)
        clear.click(
            lambda: (None, None, [], "", None, None, [], None, "", [], None, "", []),
            None,
            [files, video, inputs_gallery, input_note, viewer, scene_state, depth_gallery, downloads, status, chat,
             measure_image, measure_text, picks],
            api_name=False,
            queue=False,
        )  # fmt: skip
        for control in display:
            control.change(
                readable_errors(demo.redraw),
                inputs=[scene_state, *display],
                outputs=[viewer, downloads, status],
                api_name="redraw" if control is show_cameras else False,
                trigger_mode="always_last",
            )
        measure_view.change(demo.measure_image, [scene_state, measure_view, picks], measure_image, api_name=False)
        measure_image.select(
            demo.measure, [scene_state, measure_view, picks], [measure_image, picks, measure_text], api_name=False
        )
        ask_inputs = [scene_state, files, question, chat, video, every, step]
        for trigger, name in ((ask.click, "ask"), (question.submit, False)):
            trigger(readable_errors_stream(demo.ask), ask_inputs, [chat, question, used_views], api_name=name)
    return app


def launch(app: gr.Blocks, demo: G2VLMDemo, **options: Any) -> Any:
    """Launch with the upload size limit (gradio refuses larger uploads before they reach the demo) and the page's
    style."""
    return app.launch(max_file_size=int(demo.max_file_mb * 1e6), css=CSS, **options)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="G2VLM Gradio demo")
    parser.add_argument("--model", default=DEFAULT_MODEL, required=not DEFAULT_MODEL, help="Hub id or converted folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME (a Space sets 0.0.0.0) or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB, help="largest accepted upload, in MB")
    args = parser.parse_args(argv)
    demo = G2VLMDemo(args.model, device=args.device, max_file_mb=args.max_file_mb)

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
