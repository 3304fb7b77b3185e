"""Reconstructing the views of one scene for the command line: in one pass (at most the processor's `max_views`), or
in overlapping chunks (`chunked.stream_reconstruction`, any number of views, read lazily) merged on the CPU; both give
a [`SceneRun`] the exports take as it is. Also the few views a question about the scene is asked on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .chunked import merge_chunks, stream_reconstruction
from .inputs import ViewSource, uniform_indices
from .modeling.outputs import G2VLMReconstructionOutput

# The exports need poses, world points, depth, confidence and intrinsics; dropping the rest as each chunk arrives
# keeps the merged result at about 6 MB per 518x392 view on the host.
UNUSED_BY_EXPORTS = ("local_points", "global_points")


@dataclass
class SceneRun:
    """A reconstructed scene, as the exports need it.

    Attributes:
        output: The model's output (batch 1); a chunked run drops the local and global points.
        geometry_pixel_values: `(1, N, 3, H, W)` the views as the processor made them (to colour the exports).
        original_sizes: `(height, width)` of each view as read.
        names: Each view's name (file name or video frame).
        views: The views as read, kept by a one-pass run (a question is asked on all of them); None in chunks.
    """

    output: G2VLMReconstructionOutput
    geometry_pixel_values: torch.Tensor
    original_sizes: list[tuple[int, int]]
    names: list[str]
    views: list[Image.Image] | None = None


def reconstruct_in_one_pass(model, processor, source: ViewSource, **processor_kwargs) -> SceneRun:
    """Read every view of `source` and reconstruct them together in one model pass."""
    views = list(source)
    inputs = processor(geometry_images=views, return_tensors="pt", **processor_kwargs).to(model.device)
    with torch.inference_mode():
        output = model.reconstruct(**inputs)
    sizes = [(view.height, view.width) for view in views]
    return SceneRun(output, inputs["geometry_pixel_values"], sizes, list(source.names), views)


def reconstruct_in_chunks(
    model, processor, source: ViewSource, chunk_size: int, overlap: int, **processor_kwargs
) -> SceneRun:
    """Reconstruct `source` with `chunk_size` views per pass, each chunk sharing `overlap` views with the previous,
    reading the views lazily; the merged output lies in the first chunk's frame."""
    sizes: list[tuple[int, int]] = []

    def recorded():
        for view in source:
            sizes.append((view.height, view.width))
            yield view

    chunks = []
    for chunk in stream_reconstruction(
        model, processor, recorded(), chunk_size, overlap, total_views=len(source), **processor_kwargs
    ):
        kept = {name: value for name, value in chunk.reconstruction.items() if name not in UNUSED_BY_EXPORTS}
        chunk.reconstruction = G2VLMReconstructionOutput(**kept)
        chunks.append(chunk)
    pixels = torch.cat([chunk.geometry_pixel_values for chunk in chunks], dim=1)
    return SceneRun(merge_chunks(chunks), pixels, sizes, list(source.names[: len(sizes)]))


def views_for_question(run: SceneRun, processor, count: int) -> tuple[list[Image.Image], list[str]]:
    """The views a question about `run` is asked on, and their names: every view of a one-pass run; `count` views
    spread uniformly over a chunked run's sequence (as geometry-size images).

    Uniform in sequence order rather than by pose coverage: it does not depend on the reconstruction being right,
    and along a walk-through it spreads the views over the path."""
    if run.views is not None:
        return run.views, run.names
    chosen = uniform_indices(run.geometry_pixel_values.shape[1], count)
    pixels = processor.geometry_image_processor.unnormalize(run.geometry_pixel_values[0, chosen])
    return [Image.fromarray(image.numpy()) for image in pixels], [run.names[index] for index in chosen]


__all__ = ["SceneRun", "reconstruct_in_chunks", "reconstruct_in_one_pass", "views_for_question"]
