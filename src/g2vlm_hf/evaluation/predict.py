"""Run a G²VLM checkpoint for evaluation: geometry of a scene's views, and answers to spatial questions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..chat import answer
from ..export.validation import check_reconstruction
from .datasets import Question


def load_model(model_path: str, dtype: str = "auto", device: str = "cpu", geometry_width: int | None = None):
    """Model (eval mode, on `device`) and processor of a converted checkpoint folder or Hub id. A `geometry_width` is
    checked against the processor's patch size here, before any scene runs; pass it to [`predict_geometry`] as
    `target_width`."""
    from ..model_loading import load_checked

    model, processor = load_checked(model_path, dtype, device)
    patch = processor.geometry_image_processor.patch_size
    if geometry_width is not None and (geometry_width <= 0 or geometry_width % patch):
        raise ValueError(f"--geometry-width must be a positive multiple of the patch size, got {geometry_width}.")
    return model, processor


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize `(N, h, w)` or `(N, h, w, C)` maps to `size` = (H, W)."""
    if tuple(maps.shape[1:3]) == tuple(size):
        return maps
    channels_last = maps.ndim == 4
    grid = maps.permute(0, 3, 1, 2) if channels_last else maps[:, None]
    resized = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1) if channels_last else resized[:, 0]


@torch.inference_mode()
def predict_geometry(
    model,
    processor,
    image_paths: Sequence[Path],
    size: tuple[int, int],
    device: str,
    target_width: int | None = None,
) -> dict:
    """Depth `(N, H, W)`, world points `(N, H, W, 3)` and camera-to-world poses `(N, 4, 4)` of one scene, as float64
    numpy arrays, the maps resized to the ground-truth `size`; the views are resized to `target_width` (default: the
    processor's own)."""
    paths = [str(path) for path in image_paths]
    inputs = processor(geometry_images=paths, return_tensors="pt", target_width=target_width).to(device)
    scene = check_reconstruction(
        model.reconstruct(**inputs), inputs["geometry_pixel_values"], processor.geometry_image_processor
    )
    return {
        "depth": resize_maps(torch.from_numpy(scene.depth), size).double().numpy(),
        "world_points": resize_maps(torch.from_numpy(scene.world_points), size).double().numpy(),
        "camera_poses": scene.camera_poses,
    }


def build_prompt(question: Question) -> str:
    """The text sent with the images: the item's own `prompt`, or the question, its options and an answer format."""
    if question.prompt:
        return question.prompt
    if question.type == "multiple_choice":
        options = "\n".join(question.choices)
        return f"{question.question}\n{options}\nAnswer with the option's letter from the given choices directly."
    if question.type == "numeric":
        return f"{question.question}\nPlease answer the question using a single word or phrase."
    return question.question


@torch.inference_mode()
def answer_question(model, processor, question: Question, max_new_tokens: int = 32) -> str:
    """Greedy answer of the model to one question (the official chat prompt: geometry + semantic images)."""
    return answer(
        model, processor, [str(path) for path in question.image_paths], build_prompt(question), max_new_tokens
    )
