"""Reconstruction of any number of views in overlapping chunks, merged into the first chunk's frame and scale.

The views are cut into chunks of `chunk_size` consecutive views; each chunk after the first starts with the last
`overlap` views of the one before. Every chunk is reconstructed by the model on its own (one pass, as
`model.reconstruct`), moved to the CPU, then brought into the frame of the previous, already aligned, chunk by the
similarity (scale, rotation, translation) that best maps its world points of the shared views onto the previous
chunk's (`similarity.robust_umeyama`, weighted by both chunks' confidence when the checkpoint has a confidence head).
By induction every chunk ends in the first chunk's frame. Device memory is therefore set by `chunk_size`, not by the
number of views, and time grows linearly with it.

A view shared by two chunks is kept as the earlier chunk predicted it: that prediction has already been handed out
by the stream (which never revises what it yielded), and it is the one the next chunk was aligned to. The last chunk
is filled back to `chunk_size` views with earlier views (a longer overlap) rather than run short.

The chaining has no loop closure: errors of successive alignments add up like a random walk over the chunks, which
stays far below the per-view noise when the overlap is long enough (see the README's figures).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers.utils import logging

from .modeling.outputs import G2VLMReconstructionOutput
from .similarity import Similarity, robust_umeyama

logger = logging.get_logger(__name__)

View = TypeVar("View")
POINT_FIELDS = ("local_points", "world_points", "global_points")


def check_chunking(chunk_size: int, overlap: int) -> None:
    """Raise a ValueError unless `2 <= chunk_size` and `1 <= overlap < chunk_size`."""
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2 views, got {chunk_size}.")
    if not 1 <= overlap < chunk_size:
        raise ValueError(
            f"overlap must be at least 1 view (the chunks are aligned on the views they share) and less than "
            f"chunk_size={chunk_size}, got {overlap}."
        )


def number_of_chunks(num_views: int, chunk_size: int, overlap: int) -> int:
    """How many chunks `plan_chunks` makes of `num_views` views."""
    if num_views <= chunk_size:
        return 1 if num_views else 0
    return 1 + math.ceil((num_views - chunk_size) / (chunk_size - overlap))


def plan_chunks(views: Iterable[View], chunk_size: int, overlap: int) -> Iterator[tuple[list[View], int]]:
    """Cut `views` (read lazily, at most `chunk_size` held at a time) into overlapping chunks.

    Yields `(chunk views, shared)`: the chunk's views in order, the first `shared` of which were in earlier chunks
    (0 for the first chunk, `overlap` for the next ones, possibly more for the last one, which is filled back to
    `chunk_size` views).
    """
    check_chunking(chunk_size, overlap)
    window: deque[View] = deque(maxlen=chunk_size)
    fresh, first = 0, True
    for view in views:
        window.append(view)
        fresh += 1
        if fresh == (chunk_size if first else chunk_size - overlap):
            yield list(window), len(window) - fresh
            fresh, first = 0, False
    if fresh:
        yield list(window), len(window) - fresh


@dataclass
class ReconstructedChunk:
    """One chunk's reconstruction, aligned to the first chunk, on the CPU.

    Attributes:
        index: Chunk number, from 0.
        view_indices: Indices (in the whole sequence) of the views in `reconstruction`: the views this chunk is the
            first to reconstruct.
        reconstruction: The model's output for those views (batch 1) in the first chunk's frame and scale.
        geometry_pixel_values: `(1, views, 3, H, W)` the processor's pixels of those views (to colour exports).
        similarity: The transform applied to this chunk's poses and world points (identity for the first chunk).
        alignment_error: Median distance between the shared views' aligned points and the previous chunk's, relative
            to the median distance of those points from their centre; None for the first chunk.
    """

    index: int
    view_indices: range
    reconstruction: G2VLMReconstructionOutput
    geometry_pixel_values: torch.Tensor
    similarity: Similarity
    alignment_error: float | None


def transform_reconstruction(
    prediction: G2VLMReconstructionOutput, similarity: Similarity, global_similarity: Similarity | None = None
) -> G2VLMReconstructionOutput:
    """`prediction` moved by `similarity`: poses re-expressed (rotation composed, position transformed), local points
    and depth scaled (so world = pose x local still holds), world points transformed; global points moved by
    `global_similarity` (default `similarity`); confidence and intrinsics (pixels) unchanged."""
    global_similarity = global_similarity or similarity
    global_points = prediction.global_points
    return G2VLMReconstructionOutput(
        camera_poses=similarity.apply_to_poses(prediction.camera_poses),
        local_points=prediction.local_points * similarity.scale,
        world_points=similarity.apply(prediction.world_points),
        global_points=None if global_points is None else global_similarity.apply(global_points),
        depth=prediction.depth * similarity.scale,
        confidence=prediction.confidence,
        intrinsics=prediction.intrinsics,
    )


def select_views(prediction: G2VLMReconstructionOutput, views: slice) -> G2VLMReconstructionOutput:
    """The same output restricted to `views` (of scene 0), as contiguous CPU tensors."""
    fields = {
        name: None if value is None else value[:, views].detach().to("cpu").contiguous()
        for name, value in prediction.items()
    }
    return G2VLMReconstructionOutput(**fields)


class ChunkAligner:
    """Brings each chunk of a sequence into the frame of the first, through the views it shares with the previous one.

    Args:
        max_points: At most this many pixels of the shared views (drawn at random, the same for both chunks) enter
            each similarity fit.
        seed: Seed of that draw.
    """

    def __init__(self, max_points: int = 20_000, seed: int = 0):
        self.max_points = max_points
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: G2VLMReconstructionOutput | None = None  # the previous chunk, aligned

    def add(
        self, prediction: G2VLMReconstructionOutput, shared: int
    ) -> tuple[G2VLMReconstructionOutput, Similarity, float | None]:
        """Align `prediction` (one chunk, batch 1, CPU) whose first `shared` views are the last `shared` views of the
        previous chunk. Returns the aligned chunk, its similarity and the relative alignment error (None for the
        first chunk)."""
        if prediction.camera_poses.shape[0] != 1:
            raise ValueError(
                f"Chunks are reconstructed one scene at a time, got a batch of {prediction.camera_poses.shape[0]}."
            )
        if self.previous is None:
            if shared:
                raise ValueError(f"The first chunk cannot share views with an earlier one, got shared={shared}.")
            similarity, global_similarity, error = Similarity.identity(), None, None
        else:
            reference = select_views(self.previous, slice(-shared, None)) if shared else None
            if reference is None or reference.world_points.shape[2:] != prediction.world_points.shape[2:]:
                raise ValueError(
                    "A chunk must share at least one view of the same size with the previous chunk: got "
                    f"{shared} shared views, sizes {tuple(prediction.world_points.shape[2:4])} and "
                    f"{None if self.previous is None else tuple(self.previous.world_points.shape[2:4])}. Give all views "
                    "one size (resize_views_to_first=True on the geometry image processor)."
                )
            current = select_views(prediction, slice(0, shared))
            pixels = self._sample(reference.world_points[0, ..., 0].numel())
            weights = self._weights(reference.confidence, current.confidence, pixels)
            similarity, error = self._fit(current.world_points, reference.world_points, weights, pixels)
            global_similarity = None
            if prediction.global_points is not None and self.previous.global_points is not None:
                global_similarity, _ = self._fit(current.global_points, reference.global_points, weights, pixels)
        aligned = transform_reconstruction(prediction, similarity, global_similarity)
        self.previous = aligned
        return aligned, similarity, error

    def _sample(self, count: int) -> torch.Tensor:
        if count <= self.max_points:
            return torch.arange(count)
        return torch.randperm(count, generator=self.generator)[: self.max_points]

    @staticmethod
    def _weights(
        reference: torch.Tensor | None, current: torch.Tensor | None, pixels: torch.Tensor
    ) -> torch.Tensor | None:
        # the confidence head's output is a logit (unbounded): its sigmoid weighs a pixel by how sure both chunks are
        if reference is None or current is None:
            return None
        return (torch.sigmoid(reference.double()) * torch.sigmoid(current.double())).reshape(-1)[pixels]

    @staticmethod
    def _fit(
        source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, pixels: torch.Tensor
    ) -> tuple[Similarity, float]:
        source, target = source.reshape(-1, 3)[pixels].double(), target.reshape(-1, 3)[pixels].double()
        try:
            fit = robust_umeyama(source, target, weights)
        except ValueError as error:
            raise ValueError(f"Cannot align a chunk to the previous one through their shared views: {error}") from error
        finite = source.isfinite().all(1) & target.isfinite().all(1)
        target = target[finite]
        spread = (target - target.median(0).values).norm(dim=1).median()
        residual = (fit.apply(source[finite]) - target).norm(dim=1).median()
        return fit, float(residual / spread) if spread > 0 else float("inf")


def stream_reconstruction(
    model: Any,
    processor: Any,
    views: Iterable,
    chunk_size: int = 32,
    overlap: int = 8,
    total_views: int | None = None,
    max_alignment_points: int = 20_000,
    **processor_kwargs: Any,
) -> Iterator[ReconstructedChunk]:
    """Reconstruct `views` chunk by chunk, yielding each chunk aligned to the first as soon as it is done.

    `views` is read lazily (a generator of video frames works; at most `chunk_size` views are held), each chunk goes
    through `processor(geometry_images=chunk, **processor_kwargs)` and `model.reconstruct`, and its results leave the
    model's device before the next chunk starts. A progress bar counts the chunks, with an ETA when the number of
    views is known (`len(views)` or `total_views`).

    Args:
        model: A G²VLM model with `reconstruct` (`G2VLMForConditionalGeneration` or `G2VLMForReconstruction`).
        processor: Its `G2VLMProcessor`.
        views: Images, paths or URLs of one scene, in trajectory order (neighbours should see common structure).
        chunk_size: Views per model pass; sets peak device memory.
        overlap: Views each chunk shares with the previous one, on which it is aligned.
        total_views: The number of views, when `views` has no length (for the progress bar only).
        max_alignment_points: At most this many shared pixels per similarity fit.
    """
    check_chunking(chunk_size, overlap)
    total_views = len(views) if total_views is None and isinstance(views, Sequence) else total_views
    total = None if total_views is None else number_of_chunks(total_views, chunk_size, overlap)
    aligner = ChunkAligner(max_alignment_points)
    first_new = 0
    with logging.tqdm(total=total, desc="Reconstructing chunks", unit="chunk") as bar:
        for index, (chunk, shared) in enumerate(plan_chunks(views, chunk_size, overlap)):
            inputs = processor(geometry_images=chunk, return_tensors="pt", **processor_kwargs).to(model.device)
            with torch.inference_mode():
                prediction = select_views(model.reconstruct(**inputs), slice(None))
            pixels = inputs["geometry_pixel_values"][:, shared:].cpu()
            del inputs
            aligned, similarity, error = aligner.add(prediction, shared)
            if error is not None:
                logger.info(f"Chunk {index}: scale {similarity.scale:.4g}, relative alignment error {error:.3g}")
            new_views = range(first_new, first_new + len(chunk) - shared)
            first_new = new_views.stop
            bar.update(1)
            yield ReconstructedChunk(
                index, new_views, select_views(aligned, slice(shared, None)), pixels, similarity, error
            )


def merge_chunks(chunks: Iterable[ReconstructedChunk]) -> G2VLMReconstructionOutput:
    """One `G2VLMReconstructionOutput` (batch 1) of all views of the chunks, in order."""
    parts = [chunk.reconstruction for chunk in chunks]
    if not parts:
        raise ValueError("No chunks to merge: the view sequence was empty.")
    sizes = {tuple(part.world_points.shape[2:4]) for part in parts}
    if len(sizes) != 1:
        raise ValueError(f"The chunks have views of different sizes {sorted(sizes)}; give all views one size.")
    merged = {}
    for name in parts[0]:
        values = [getattr(part, name) for part in parts]
        merged[name] = torch.cat(values, dim=1) if all(value is not None for value in values) else None
    return G2VLMReconstructionOutput(**merged)


def reconstruct_chunked(
    model: Any, processor: Any, views: Iterable, chunk_size: int = 32, overlap: int = 8, **kwargs: Any
) -> G2VLMReconstructionOutput:
    """Reconstruct any number of views in overlapping chunks (see [`stream_reconstruction`] for the arguments) and
    return one output with every view in the first chunk's frame and scale, on the CPU.

    Example:
        ```python
        output = g2vlm_hf.reconstruct_chunked(model, processor, frames, chunk_size=32, overlap=8)
        output.camera_poses.shape  # (1, len(frames), 4, 4)
        ```
    """
    return merge_chunks(stream_reconstruction(model, processor, views, chunk_size, overlap, **kwargs))


__all__ = [
    "ChunkAligner",
    "ReconstructedChunk",
    "merge_chunks",
    "plan_chunks",
    "reconstruct_chunked",
    "stream_reconstruction",
    "transform_reconstruction",
]
