"""G²VLM demo: upload views of one scene, see it in 3D, ask spatial questions about it.

    pip install "g2vlm-hf[demo]"
    python demo/app.py --model user/g2vlm-2b          # a Hub id or a converted folder (or set G2VLM_MODEL)

As a Hugging Face Space: this file as `app.py`, `requirements.txt` naming g2vlm-hf[demo], and the `G2VLM_MODEL`
variable set to the model repository. Reconstruction writes a GLB (coloured points + one camera frustum per view)
with `g2vlm_hf.export.export_model_scene`; the chat answers with the views' geometry in the model's context.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

import gradio as gr
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import g2vlm_hf  # noqa: F401  (registers G2VLM with the Auto classes)
from g2vlm_hf.export import export_model_scene

DEFAULT_MODEL = os.environ.get("G2VLM_MODEL", "")


def _paths(files: Sequence | None) -> list[str]:
    """File paths from what gr.File gives (paths, or objects with a `.name`)."""
    paths = [getattr(item, "name", item) for item in files or []]
    if not paths:
        raise gr.Error("Upload one or more views of the scene first.")
    return [str(path) for path in paths]


class G2VLMDemo:
    """The model behind the demo: reconstruction to GLB and spatial question answering."""

    def __init__(self, model: str, device: str | None = None, max_new_tokens: int = 128, max_points: int = 200_000):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype="auto").to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        self.max_new_tokens = max_new_tokens
        self.max_points = max_points
        # one folder per request inside one scratch folder, removed with the demo (Gradio copies what it serves)
        self.scratch = tempfile.TemporaryDirectory(prefix="g2vlm-demo-")

    def close(self) -> None:
        """Remove the scenes written so far."""
        self.scratch.cleanup()

    def reconstruct(self, files: Sequence | None) -> str:
        """Reconstruct the uploaded views; return the path of the GLB scene."""
        inputs = self.processor(geometry_images=_paths(files), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            scene = self.model.reconstruct(**inputs)
        written = export_model_scene(
            tempfile.mkdtemp(prefix="scene-", dir=self.scratch.name),
            scene,
            inputs["geometry_pixel_values"],
            self.processor.geometry_image_processor,
            max_points=self.max_points,
        )
        return str(next(path for path in written if path.suffix == ".glb"))

    def answer(self, files: Sequence | None, question: str) -> str:
        """Answer `question` about the uploaded views (each used as a geometry view and a semantic image)."""
        if not question.strip():
            raise gr.Error("Type a question about the views.")
        content = [{"type": "image", "image": path} for path in _paths(files)] + [{"type": "text", "text": question}]
        inputs = self.processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def ask(self, files: Sequence | None, question: str, history: list | None) -> tuple[list, str]:
        """Chat-box handler: append the question and its answer to the history, clear the text box."""
        history = list(history or [])
        history += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": self.answer(files, question)},
        ]
        return history, ""


def build_demo(demo: G2VLMDemo) -> gr.Blocks:
    """The Gradio app: views in, GLB scene and spatial QA out. API names: `/reconstruct`, `/ask`."""
    with gr.Blocks(title="G²VLM: 3D reconstruction and spatial reasoning") as app:
        gr.Markdown(
            "# G²VLM\nUpload several views of one scene. **Reconstruct** shows camera poses and the point cloud in "
            "3D; the chat answers questions with the scene's geometry in the model's context."
        )
        views = gr.File(label="Views of one scene", file_count="multiple", file_types=["image"], type="filepath")
        with gr.Row():
            with gr.Column():
                run = gr.Button("Reconstruct", variant="primary")
                scene = gr.Model3D(label="Scene (points + cameras)", display_mode="point_cloud")
            with gr.Column():
                chat = gr.Chatbot(label="Spatial QA")
                question = gr.Textbox(label="Question", placeholder="How far is the chair from the door?")
                ask = gr.Button("Ask")
        run.click(demo.reconstruct, inputs=views, outputs=scene, api_name="reconstruct")
        ask.click(demo.ask, inputs=[views, question, chat], outputs=[chat, question], api_name="ask")
        question.submit(demo.ask, inputs=[views, question, chat], outputs=[chat, question], api_name=False)
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
