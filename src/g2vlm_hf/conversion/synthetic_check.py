"""Run a converted model once on a synthetic input before it is saved in place.

A renaming that puts every weight in a slot of the right shape can still give a model that does not run (a config
value the port reads differently, a wrong dtype) or runs to NaN. This check builds the smallest chat input (one
semantic image of one merged patch, one geometry view of 2x2 patches, a text token) from the config alone, runs the
language model and the reconstruction once, and fails unless every output is finite and of the expected shape. It
does not compare numbers with the official code: that needs the official implementation and its outputs on the
same input (see the README's conversion section).
"""

from __future__ import annotations

import torch

from ..modeling import G2VLMForConditionalGeneration

GEOMETRY_GRID = (2, 2)  # patches of the synthetic geometry view


def synthetic_inputs(model: G2VLMForConditionalGeneration, seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-prompt chat input: a geometry view block, a semantic image block and one text token, random pixels."""
    config, vision = model.config, model.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    merge = vision.spatial_merge_size
    patch_width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(merge * merge, patch_width, generator=generator)
    patch = config.geometry_patch_size
    geometry = torch.randn(1, 1, 3, GEOMETRY_GRID[0] * patch, GEOMETRY_GRID[1] * patch, generator=generator)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    geometry_tokens = [config.geometry_token_id] * (GEOMETRY_GRID[0] * GEOMETRY_GRID[1])
    ids = [start, *geometry_tokens, end, start, config.image_token_id, end, config.text_config.eos_token_id]
    dtype = model.dtype
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pixel_values.to(dtype),
        "image_grid_thw": torch.tensor([[1, merge, merge]]),
        "geometry_pixel_values": geometry.to(dtype),
    }


def check_runs_on_synthetic_input(model: G2VLMForConditionalGeneration) -> None:
    """Raise `ValueError` unless `model` gives finite logits and reconstruction outputs of the expected shapes."""
    inputs = synthetic_inputs(model)
    length = inputs["input_ids"].shape[1]
    height, width = inputs["geometry_pixel_values"].shape[-2:]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        scene = model.reconstruct(**inputs)
    expected = {
        "logits": (logits, (1, length, model.config.text_config.vocab_size)),
        "camera_poses": (scene.camera_poses, (1, 1, 4, 4)),
        "world_points": (scene.world_points, (1, 1, height, width, 3)),
        "depth": (scene.depth, (1, 1, height, width)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"The converted model gives {name} of shape {tuple(tensor.shape)}, expected {shape}.")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"The converted model gives non-finite {name} on a synthetic input: a weight was probably placed "
                "wrongly or the checkpoint is damaged; nothing was written."
            )
