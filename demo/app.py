"""G²VLM demo: upload views (or a video) of one scene, see it in 3D with its cameras and depth, ask spatial questions.

    pip install "g2vlm-hf[demo]"
    python demo/app.py --model user/g2vlm-2b          # a Hub id or a converted folder (or set G2VLM_MODEL)

As a Hugging Face Space: this file as `app.py`, `requirements.txt` naming g2vlm-hf[demo], and the `G2VLM_MODEL`
variable set to the model repository.

What it does: the views are reconstructed once (`model.reconstruct`); the 3D view (coloured points + one camera frustum
per view, in that view's colour) is redrawn from the kept reconstruction when the confidence slider, the cameras
switch or the point colouring change. Downloads: the GLB scene, the PLY point cloud, `cameras.json` (poses and
intrinsics) and a zipped COLMAP model. The chat answers with the same views' geometry in the model's context, and
shows which views it used.
"""

import argparse
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import g2vlm_hf  # noqa: F401  (registers G2VLM with the Auto classes)
from g2vlm_hf.chat import answer
from g2vlm_hf.cli import CLIError, video_frames
from g2vlm_hf.export import colourise_depth, export_reconstruction, filter_points, save_scene_glb, view_colours
from g2vlm_hf.export_colmap import export_colmap
from g2vlm_hf.processing.image_io import load_image

DEFAULT_MODEL = os.environ.get("G2VLM_MODEL", "")
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# The model's world frame is the first camera's OpenCV frame (y down, z forward); the viewer is y-up, so the scene it
# shows is turned half a turn about x. Downloads keep the model's frame.
VIEWER_FROM_WORLD = np.diag([1.0, -1.0, -1.0, 1.0])


def _paths(files: Sequence | None) -> list[str]:
    """File paths from what gr.File gives (paths, or objects with a `.name`)."""
    return [str(getattr(item, "name", item)) for item in files or []]


def readable_errors(handler: Callable) -> Callable:
    """Shows a failing handler's problem as a readable message in the page (gr.Error) instead of a bare 'Error'."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except gr.Error:
            raise
        except (CLIError, ValueError, OSError) as error:
            raise gr.Error(str(error)) from error

    return wrapper


def example_scenes() -> tuple[list[list[list[str]]], list[str]]:
    """The bundled example scenes (one folder of views each, rendered with exact geometry by
    `g2vlm_hf.training.render_room`), as gr.Examples rows and their labels."""
    folders = [folder for folder in sorted(EXAMPLES_DIR.iterdir()) if folder.is_dir()]
    rows = [[sorted(str(path) for path in folder.glob("*.png"))] for folder in folders]
    labels = [f"{folder.name.replace('_', ', ')} ({len(row[0])} views)" for folder, row in zip(folders, rows)]
    return rows, labels


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


class G2VLMDemo:
    """The model behind the demo: reconstruction to GLB/PLY/COLMAP and spatial question answering."""

    def __init__(self, model: str, device: str | None = None, max_new_tokens: int = 128, max_points: int = 200_000):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype="auto").to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.max_new_tokens = max_new_tokens
        self.max_points = max_points
        self.has_confidence = bool(getattr(self.model.config, "use_confidence_head", False))
        # one folder per request inside one scratch folder, removed with the demo (Gradio copies what it serves)
        self.scratch = tempfile.TemporaryDirectory(prefix="g2vlm-demo-")

    def close(self) -> None:
        """Remove the scenes written so far."""
        self.scratch.cleanup()

    # ------------------------------------------------------------------------------------------------------ inputs

    def views(self, files: Sequence | None, video: str | None = None, every: int = 10) -> tuple[list, list[str]]:
        """The views to use and their names: the uploaded images, else the frames of the uploaded video."""
        paths = _paths(files)
        if paths:
            return [load_image(path) for path in paths], [Path(path).name for path in paths]
        if video:
            every = max(1, int(every))
            frames = video_frames(Path(video), every, max_frames=self.processor.geometry_image_processor.max_views)
            return frames, [f"frame {index * every}" for index in range(len(frames))]
        raise gr.Error("Upload images (or a video) of the scene first, or click an example scene.")

    def gallery(self, files: Sequence | None) -> list[tuple[str, str]]:
        """The uploaded views, for the gallery."""
        return [(path, Path(path).name) for path in _paths(files)]

    # --------------------------------------------------------------------------------------------- reconstruction

    def reconstruct(
        self,
        files: Sequence | None,
        video: str | None = None,
        every: float = 10,
        percentile: float = 0.0,
        show_cameras: bool = True,
        colouring: str = "image",
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (how Gradio asks for a progress bar)
    ) -> tuple[str, list, list, list[str], Scene, str]:
        """Reconstruct the views: the viewer's GLB, the input gallery, the depth previews, the downloads, the kept
        scene and a status line."""
        progress(0.05, desc="Reading the views")
        views, names = self.views(files, video, int(every))
        progress(0.2, desc=f"Reconstructing {len(views)} views")
        inputs = self.processor(geometry_images=views, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            output = self.model.reconstruct(**inputs)
        images = self.processor.geometry_image_processor.unnormalize(inputs["geometry_pixel_values"][0].cpu()).numpy()
        confidence = None if output.confidence is None else output.confidence[0].float().cpu().numpy()
        scene = Scene(
            folder=Path(tempfile.mkdtemp(prefix="scene-", dir=self.scratch.name)),
            views=views,
            names=names,
            camera_poses=output.camera_poses[0].float().cpu().numpy(),
            world_points=output.world_points[0].float().cpu().numpy(),
            depth=output.depth[0].float().cpu().numpy(),
            confidence=confidence,
            intrinsics=output.intrinsics[0].float().cpu().numpy(),
            images=images,
        )
        progress(0.7, desc="Writing the scene files")
        downloads, status = self.downloads(scene, percentile)
        progress(0.9, desc="Drawing the 3D view")
        glb = self.viewer_scene(scene, percentile, show_cameras, colouring)
        depth_previews = [(colourise_depth(depth), f"{name}: depth") for depth, name in zip(scene.depth, names)]
        gallery = [(np.asarray(view.convert("RGB")), name) for view, name in zip(views, names)]
        return glb, gallery, depth_previews, downloads, scene, status

    def downloads(self, scene: Scene, percentile: float) -> tuple[list[str], str]:
        """GLB, PLY, cameras.json and a zipped COLMAP model of the scene, and a status line."""
        folder = scene.folder / "download"
        options = {"confidence_percentile": self._percentile(scene, percentile), "max_points": self.max_points}
        written = export_reconstruction(
            folder,
            camera_poses=scene.camera_poses,
            world_points=scene.world_points,
            depth=scene.depth,
            images=scene.images,
            confidence=scene.confidence,
            intrinsics=scene.intrinsics,
            original_sizes=[(view.height, view.width) for view in scene.views],
            **options,
        )
        files = [str(path) for path in written if path.name in ("scene.glb", "points.ply", "cameras.json")]
        status = f"Reconstructed {len(scene.views)} views."
        try:
            export_colmap(
                folder / "colmap",
                camera_poses=scene.camera_poses,
                world_points=scene.world_points,
                intrinsics=scene.intrinsics,
                images=scene.images,
                confidence=scene.confidence,
                image_names=[f"view_{index:03d}.png" for index in range(len(scene.views))],
                **options,
            )
            files.append(shutil.make_archive(str(folder / "colmap"), "zip", folder / "colmap"))
        except ValueError as error:  # e.g. no view looks like a pinhole camera: the rest is still useful
            status += f" No COLMAP model: {error}."
        return files, status

    def _percentile(self, scene: Scene, percentile: float) -> float | None:
        return float(percentile) if scene.confidence is not None and percentile > 0 else None

    def redraw(self, scene: Scene | None, percentile: float, show_cameras: bool, colouring: str) -> Any:
        """Display options changed: redraw the kept scene (nothing to do before the first reconstruction)."""
        return gr.skip() if scene is None else self.viewer_scene(scene, percentile, show_cameras, colouring)

    def viewer_scene(self, scene: Scene | None, percentile: float, show_cameras: bool, colouring: str) -> str:
        """A GLB of the kept scene for the 3D viewer (turned y-up), drawn with the current display options."""
        if scene is None:
            raise gr.Error("Reconstruct a scene first.")
        images = scene.images
        if colouring == "view":
            images = np.broadcast_to(view_colours(len(images))[:, None, None], images.shape).copy()
        points, colours = filter_points(
            scene.world_points,
            images,
            scene.confidence,
            confidence_percentile=self._percentile(scene, percentile),
            max_points=self.max_points,
        )
        points = points @ VIEWER_FROM_WORLD[:3, :3].T.astype(np.float32)
        poses = VIEWER_FROM_WORLD @ scene.camera_poses
        path = Path(tempfile.mkstemp(prefix="view-", suffix=".glb", dir=scene.folder)[1])
        save_scene_glb(path, points, colours, poses, image_size=scene.depth.shape[1:], show_cameras=show_cameras)
        return str(path)

    # ------------------------------------------------------------------------------------------------------- chat

    def answer(self, files: Sequence | None, question: str, video: str | None = None, every: int = 10) -> str:
        """Answer `question` about the views (each used as a geometry view and a semantic image)."""
        views, _ = self.views(files, video, every)
        return self._answer(views, question)

    def _answer(self, views: list, question: str) -> str:
        if not question or not question.strip():
            raise gr.Error("Type a question about the views.")
        return answer(self.model, self.processor, views, question, self.max_new_tokens)

    def ask(
        self,
        scene: Scene | None,
        files: Sequence | None,
        question: str,
        history: list | None,
        video: str | None = None,
        every: float = 10,
    ) -> tuple[list, str, list]:
        """Chat handler: answers about the reconstructed scene's views (else the uploaded ones); appends the question
        and the answer, with the views it used, to the history, clears the text box, and shows those views."""
        if scene is not None:
            views, names = scene.views, scene.names
        else:
            views, names = self.views(files, video, int(every))
        answer = self._answer(views, question)
        history = [
            *(history or []),
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{answer}\n\n*Views used: {', '.join(names)}*"},
        ]
        used = [(np.asarray(view.convert("RGB")), name) for view, name in zip(views, names)]
        return history, "", used


def build_demo(demo: G2VLMDemo) -> gr.Blocks:
    """The Gradio app. API names: `/reconstruct`, `/redraw`, `/ask`."""
    with gr.Blocks(title="G²VLM: 3D reconstruction and spatial reasoning") as app:
        gr.Markdown(
            "# G²VLM\nUpload several views (or a video) of one scene and press **Reconstruct**: the 3D view shows "
            "the points and one camera per view (each view has its colour), the **Depth** tab each view's depth "
            "(light = near). Then ask a spatial question: the model answers with the scene's geometry in its context."
        )
        scene_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Images"):
                    files = gr.File(
                        label="Views of one scene", file_count="multiple", file_types=["image"], type="filepath",
                        elem_id="views-input",
                    )  # fmt: skip
                with gr.Tab("Video"):
                    video = gr.Video(label="Video of the scene", sources=["upload"])
                    every = gr.Slider(1, 60, value=10, step=1, label="Use every N-th frame")
                examples, labels = example_scenes()
                gr.Examples(
                    examples=examples, inputs=[files], example_labels=labels, label="Example scenes (click one)"
                )
                inputs_gallery = gr.Gallery(label="Input views", columns=4, height=200, elem_id="input-gallery")
                run = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")
                percentile = gr.Slider(
                    0,
                    95,
                    value=10 if demo.has_confidence else 0,
                    step=5,
                    label="Hide the least confident points (percentile)",
                    visible=demo.has_confidence,
                )
                show_cameras = gr.Checkbox(value=True, label="Show cameras")
                colouring = gr.Radio(["image", "view"], value="image", label="Colour points by")
            with gr.Column(scale=2):
                with gr.Tab("3D scene"):
                    viewer = gr.Model3D(
                        label="Scene (points + cameras)", display_mode="solid", clear_color=(0.12, 0.12, 0.14, 1.0),
                        elem_id="scene-viewer", height=480,
                    )  # fmt: skip
                with gr.Tab("Depth"):
                    depth_gallery = gr.Gallery(
                        label="Depth per view (light = near)", columns=3, elem_id="depth-gallery"
                    )
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(
                    label="Downloads: GLB, PLY, cameras.json, COLMAP (zip)", file_count="multiple", elem_id="downloads"
                )
            with gr.Column(scale=1):
                chat = gr.Chatbot(label="Spatial QA about this scene", elem_id="chat", height=360)
                question = gr.Textbox(
                    label="Question", placeholder="How far is the chair from the door?", elem_id="question"
                )
                ask = gr.Button("Ask", elem_id="ask-button")
                used_views = gr.Gallery(label="Views the answer used", columns=4, height=160)

        files.change(readable_errors(demo.gallery), inputs=files, outputs=inputs_gallery, api_name=False)
        run.click(
            readable_errors(demo.reconstruct),
            inputs=[files, video, every, percentile, show_cameras, colouring],
            outputs=[viewer, inputs_gallery, depth_gallery, downloads, scene_state, status],
            api_name="reconstruct",
        )
        redraw = readable_errors(demo.redraw)
        for control, trigger in ((percentile, "release"), (show_cameras, "change"), (colouring, "change")):
            getattr(control, trigger)(
                redraw,
                inputs=[scene_state, percentile, show_cameras, colouring],
                outputs=viewer,
                api_name="redraw" if control is show_cameras else False,
            )
        ask_inputs = [scene_state, files, question, chat, video, every]
        ask.click(readable_errors(demo.ask), inputs=ask_inputs, outputs=[chat, question, used_views], api_name="ask")
        question.submit(
            readable_errors(demo.ask), inputs=ask_inputs, outputs=[chat, question, used_views], api_name=False
        )
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="G2VLM Gradio demo")
    parser.add_argument("--model", default=DEFAULT_MODEL, required=not DEFAULT_MODEL, help="Hub id or converted folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME (a Space sets 0.0.0.0) or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    args = parser.parse_args(argv)
    build_demo(G2VLMDemo(args.model, device=args.device)).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
