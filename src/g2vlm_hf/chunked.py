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

Errors of successive alignments add up along the chain (like a random walk for noise, linearly for a model's
systematic drift). With loop closure (`reconstruct_chunked(..., loop_closure=True)`, [`close_loops`]) the places the
sequence revisits, found by the geometry encoder's own image features, are reconstructed together in a pair chunk and
a pose-graph optimisation over the chunks' similarities spreads the drift along the loop (`loop_closure.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers.utils import logging

from .integers import is_integer
from .loop_closure import (
    LoopCandidate,
    LoopClosureConfig,
    PoseGraphEdge,
    co_visible_share,
    find_loop_candidates,
    optimise_pose_graph,
    record_view_descriptors,
    require_scipy,
)
from .modeling.outputs import G2VLMReconstructionOutput
from .similarity import Similarity, robust_umeyama

logger = logging.get_logger(__name__)

View = TypeVar("View")


def check_chunking(chunk_size: int, overlap: int) -> None:
    """Raise a ValueError unless `2 <= chunk_size` and `1 <= overlap < chunk_size` (integers)."""
    for name, value in (("chunk_size", chunk_size), ("overlap", overlap)):
        if not is_integer(value):
            raise ValueError(f"{name} must be an integer number of views, got {value!r}.")
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2 views, got {chunk_size}.")
    if not 1 <= overlap < chunk_size:
        raise ValueError(
            f"overlap must be at least 1 view (the chunks are aligned on the views they share) and less than "
            f"chunk_size={chunk_size}, got {overlap}."
        )


def check_view_iterable(views: object) -> None:
    """Raise a ValueError when `views` is one path (a string would be read letter by letter as views)."""
    if isinstance(views, (str, bytes, os.PathLike)):
        raise ValueError(
            f"`views` must hold the views of the scene (a list of images or paths, or an iterable of frames), got the "
            f"single path {os.fsdecode(views)!r}; for a folder of images pass e.g. `sorted(Path(folder).glob('*.jpg'))`."
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
    chunk_size, overlap = int(chunk_size), int(overlap)  # numpy integers too
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
        descriptors: `(views, dim)` L2-normalised descriptors of those views from the geometry encoder (for loop
            closure), when the stream was asked for them (`describe_views=True`); else None.
    """

    index: int
    view_indices: range
    reconstruction: G2VLMReconstructionOutput
    geometry_pixel_values: torch.Tensor
    similarity: Similarity
    alignment_error: float | None
    descriptors: torch.Tensor | None = None


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
        if not is_integer(max_points) or max_points < 3:
            raise ValueError(
                f"max_alignment_points must be an integer of at least 3 (a similarity is fitted to them), got "
                f"{max_points!r}."
            )
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


def launch_views(
    model: Any, processor: Any, views: list, describe_views: bool = False, **processor_kwargs: Any
) -> tuple[G2VLMReconstructionOutput, torch.Tensor, torch.Tensor | None]:
    """One model pass over `views` (one scene), queued on the model's device: the output there (on a GPU still being
    computed when this returns), the processor's geometry pixels `(1, views, 3, H, W)` on the CPU, and with
    `describe_views` the views' `(views, dim)` geometry-encoder descriptors."""
    inputs = processor(geometry_images=views, return_tensors="pt", **processor_kwargs)
    pixels = inputs["geometry_pixel_values"].cpu()
    recorder = record_view_descriptors(model) if describe_views else contextlib.nullcontext([])
    with torch.inference_mode(), recorder as recorded:
        prediction = model.reconstruct(**inputs.to(model.device))
    descriptors = torch.cat(recorded) if recorded else None
    return prediction, pixels, descriptors


def reconstruct_views(
    model: Any, processor: Any, views: list, describe_views: bool = False, **processor_kwargs: Any
) -> tuple[G2VLMReconstructionOutput, torch.Tensor, torch.Tensor | None]:
    """[`launch_views`] with the output brought to the CPU."""
    prediction, pixels, descriptors = launch_views(model, processor, views, describe_views, **processor_kwargs)
    return select_views(prediction, slice(None)), pixels, descriptors


def stream_reconstruction(
    model: Any,
    processor: Any,
    views: Iterable,
    chunk_size: int = 32,
    overlap: int = 8,
    total_views: int | None = None,
    max_alignment_points: int = 20_000,
    describe_views: bool = False,
    **processor_kwargs: Any,
) -> Iterator[ReconstructedChunk]:
    """Reconstruct `views` chunk by chunk, yielding each chunk aligned to the first as soon as it is done.

    `views` is read lazily (a generator of video frames works; at most two chunks of views are held), each chunk goes
    through `processor(geometry_images=chunk, **processor_kwargs)` and `model.reconstruct`, and its results leave the
    model's device before the next chunk starts. The host's share of a chunk (its alignment, and whatever the caller
    does with it before asking for the next one) overlaps the device's work on the following chunk: that chunk is
    queued on the device before the previous one is aligned and yielded. A progress bar counts the chunks, with an
    ETA when the number of views is known (`len(views)` or `total_views`).

    Args:
        model: A G²VLM model with `reconstruct` (`G2VLMForConditionalGeneration` or `G2VLMForReconstruction`).
        processor: Its `G2VLMProcessor`.
        views: Images, paths or URLs of one scene, in trajectory order (neighbours should see common structure).
        chunk_size: Views per model pass; sets peak device memory.
        overlap: Views each chunk shares with the previous one, on which it is aligned.
        total_views: The number of views, when `views` has no length (for the progress bar only).
        max_alignment_points: At most this many shared pixels per similarity fit.
        describe_views: Also record each view's descriptor from the geometry encoder (`ReconstructedChunk.descriptors`,
            for [`close_loops`]); read off the model's own pass, at no extra compute.
    """
    check_view_iterable(views)
    check_chunking(chunk_size, overlap)
    total_views = len(views) if total_views is None and isinstance(views, Sequence) else total_views
    total = None if total_views is None else number_of_chunks(total_views, chunk_size, overlap)
    aligner = ChunkAligner(max_alignment_points)

    def aligned(chunk: ReconstructedChunk, shared: int) -> ReconstructedChunk:
        """`chunk` (its whole output, on the CPU) aligned to the previous one and cut to its new views."""
        prediction, similarity, error = aligner.add(chunk.reconstruction, shared)
        if error is not None:
            logger.info(f"Chunk {chunk.index}: scale {similarity.scale:.4g}, relative alignment error {error:.3g}")
        bar.update(1)
        return dataclasses.replace(
            chunk,
            reconstruction=select_views(prediction, slice(shared, None)),
            geometry_pixel_values=chunk.geometry_pixel_values[:, shared:],
            similarity=similarity,
            alignment_error=error,
            descriptors=None if chunk.descriptors is None else chunk.descriptors[shared:],
        )

    first_new = 0
    previous: tuple[ReconstructedChunk, int] | None = None  # on the CPU, not yet aligned
    with logging.tqdm(total=total, desc="Reconstructing chunks", unit="chunk") as bar:
        for index, (chunk, shared) in enumerate(plan_chunks(views, chunk_size, overlap)):
            prediction, pixels, descriptors = launch_views(model, processor, chunk, describe_views, **processor_kwargs)
            if previous is not None:
                yield aligned(*previous)  # while the device computes this chunk
            new_views = range(first_new, first_new + len(chunk) - shared)
            first_new = new_views.stop
            on_host = select_views(prediction, slice(None))  # waits for the device
            del prediction
            # all of the chunk's views, in its own frame, until `aligned`
            previous = (
                ReconstructedChunk(index, new_views, on_host, pixels, Similarity.identity(), None, descriptors),
                shared,
            )
        if previous is not None:
            yield aligned(*previous)


@dataclass(frozen=True)
class ClosedLoop:
    """A verified loop: the candidate, the chunks of its two views, the relative errors of the pair chunk's fits onto
    the chain's views of the two places, and the co-visible share of the two places in the pair chunk."""

    candidate: LoopCandidate
    chunks: tuple[int, int]
    alignment_errors: tuple[float, float]
    co_visible: float


def place_window(view: int, window: int, num_views: int) -> range:
    """`window` consecutive views around `view`, inside `[0, num_views)`."""
    start = min(max(0, view - window // 2), max(0, num_views - window))
    return range(start, min(num_views, start + window))


def gather_views(chunks: Sequence[ReconstructedChunk], views: range) -> G2VLMReconstructionOutput:
    """The aligned outputs of `views` (consecutive, each owned by the chunk that reconstructed it first)."""
    parts = []
    for chunk in chunks:
        first, last = max(views.start, chunk.view_indices.start), min(views.stop, chunk.view_indices.stop)
        if first < last:
            offset = chunk.view_indices.start
            parts.append(select_views(chunk.reconstruction, slice(first - offset, last - offset)))
    return merge_outputs(parts)


def chunk_anchor(chunk: ReconstructedChunk) -> Similarity:
    """A unitless frame centred on a chunk, in the chunk's own frame: its origin at the median of the chunk's camera
    centres, its unit the median distance of (a sample of) its world points from their median."""
    inverse = chunk.similarity.inverse()
    centre = inverse.apply(chunk.reconstruction.camera_poses[0, :, :3, 3].double()).median(0).values
    points = chunk.reconstruction.world_points.reshape(-1, 3).double()
    points = inverse.apply(points[points.isfinite().all(1)][:: max(1, points.shape[0] // 20_000)])
    spread = float((points - points.median(0).values).norm(dim=1).median()) if len(points) else 0.0
    return Similarity(spread if spread > 0 else 1.0, torch.eye(3, dtype=torch.float64), centre)


def close_loops(
    model: Any,
    processor: Any,
    views: Sequence,
    chunks: Sequence[ReconstructedChunk],
    config: LoopClosureConfig | None = None,
    max_alignment_points: int = 20_000,
    **processor_kwargs: Any,
) -> tuple[list[ReconstructedChunk], list[ClosedLoop]]:
    """Find loops in a chunked reconstruction, verify them, and move every chunk by a pose-graph optimisation.

    1. Candidates: view pairs far apart in the sequence whose geometry-encoder descriptors are alike
       (`loop_closure.find_loop_candidates`; the chunks must come from `stream_reconstruction(...,
       describe_views=True)`).
    2. Verification: the `window` views around each of the two views are reconstructed together in one pass (a pair
       chunk, of the size of a chunk); the pair chunk's points of each place are fitted (`robust_umeyama`) onto the
       chain's aligned points of the same views. A loop is kept when both fits are good (relative error at most
       `max_alignment_error`) and, inside the pair chunk, the second place's points lie on the first place's
       (co-visible share at least `min_co_visible`): the model saw one place twice, not two places. A progress bar
       counts the candidates (one model pass each: up to `max_loops` passes, which can take as long as the stream).
    3. Each kept loop measures the similarity between the frames of the two views' chunks (the fit of the first place
       composed with the inverse fit of the second: what moves the chain near the second place onto the pair chunk's
       view of it relative to the first); consecutive chunks are joined by their chained alignments. The pose graph of
       one Sim(3) per chunk is solved (`loop_closure.optimise_pose_graph`, scipy) and each chunk is moved by the
       change of its similarity (its global points by the same change seen in the global head's frame).

    Args:
        views: The same views as streamed, as a sequence: the views of loop candidates are read again.
        chunks: All chunks of the stream, in order, with descriptors.
        config: The settings ([`LoopClosureConfig`]).
        max_alignment_points: At most this many pixels per similarity fit.
        processor_kwargs: As given to the stream (`target_width`, ...).

    Returns:
        The chunks moved into the optimised frame (unchanged when no loop is kept), and the loops kept.

    Raises:
        ValueError: When the chunks carry no descriptors.
        ImportError: When scipy is not installed.
    """
    config = config or LoopClosureConfig()
    chunks = list(chunks)
    if len(chunks) < 2:
        return chunks, []
    if any(chunk.descriptors is None for chunk in chunks):
        raise ValueError("Loop closure needs the views' descriptors: stream with `describe_views=True`.")
    require_scipy()
    chunk_size = len(chunks[0].view_indices)
    num_views = chunks[-1].view_indices.stop
    window = config.window or max(1, chunk_size // 2)
    candidates = find_loop_candidates(
        torch.cat([chunk.descriptors for chunk in chunks]),
        max(config.min_separation or max(2 * chunk_size, num_views // 10), 2 * window),  # disjoint places
        config.suppression or chunk_size,
        config.similarity_threshold,
        config.max_loops,
    )
    owner = [chunk.index for chunk in chunks for _ in chunk.view_indices]
    aligner = ChunkAligner(max_alignment_points)
    loops, edges = [], []
    for candidate in logging.tqdm(candidates, desc="Verifying loop candidates", unit="candidate"):
        places = (place_window(candidate.first, window, num_views), place_window(candidate.second, window, num_views))
        pair, _, _ = reconstruct_views(
            model, processor, [views[index] for place in places for index in place], **processor_kwargs
        )
        parts = (select_views(pair, slice(0, len(places[0]))), select_views(pair, slice(len(places[0]), None)))
        fits = []
        for place, part in zip(places, parts, strict=True):
            chain = gather_views(chunks, place)
            if chain.world_points.shape[2:] != part.world_points.shape[2:]:
                raise ValueError("Loop closure needs views of one size (resize_views_to_first=True).")
            pixels = aligner._sample(chain.world_points[0, ..., 0].numel())
            weights = aligner._weights(chain.confidence, part.confidence, pixels)
            fits.append(aligner._fit(part.world_points, chain.world_points, weights, pixels))
        co_visible = co_visible_share(parts[0].world_points, parts[1].world_points)
        errors = (fits[0][1], fits[1][1])
        if max(errors) > config.max_alignment_error or co_visible < config.min_co_visible:
            logger.info(
                f"Loop candidate views {candidate.first}-{candidate.second} (similarity {candidate.score:.3f}) "
                f"rejected: alignment errors {errors[0]:.3g}, {errors[1]:.3g}, co-visible share {co_visible:.2f}"
            )
            continue
        first, second = owner[candidate.first], owner[candidate.second]
        correction = fits[0][0].compose(fits[1][0].inverse())  # chain near place 2 -> consistent with place 1
        measurement = chunks[first].similarity.inverse().compose(correction).compose(chunks[second].similarity)
        edges.append(PoseGraphEdge(first, second, measurement, config.loop_weight))
        loops.append(ClosedLoop(candidate, (first, second), errors, co_visible))
    logger.info(f"Loop closure: {len(loops)} of {len(candidates)} candidates kept")
    if not loops:
        return chunks, []
    sequential = [
        PoseGraphEdge(i - 1, i, chunks[i - 1].similarity.inverse().compose(chunks[i].similarity))
        for i in range(1, len(chunks))
    ]
    optimised = optimise_pose_graph(
        [chunk.similarity for chunk in chunks], sequential + edges, [chunk_anchor(chunk) for chunk in chunks]
    )
    to_global = global_frame_of(chunks[0])
    moved = []
    for chunk, similarity in zip(chunks, optimised, strict=True):
        change = similarity.compose(chunk.similarity.inverse())
        global_change = None if to_global is None else to_global.inverse().compose(change).compose(to_global)
        reconstruction = transform_reconstruction(chunk.reconstruction, change, global_change)
        moved.append(dataclasses.replace(chunk, reconstruction=reconstruction, similarity=similarity))
    return moved, loops


def global_frame_of(chunk: ReconstructedChunk) -> Similarity | None:
    """The similarity from the global head's frame to the world frame of a chunk (fitted on its points), or None when
    the chunk has no global points."""
    output = chunk.reconstruction
    if output.global_points is None:
        return None
    return robust_umeyama(output.global_points.reshape(-1, 3)[::7], output.world_points.reshape(-1, 3)[::7])


def merge_outputs(parts: Sequence[G2VLMReconstructionOutput]) -> G2VLMReconstructionOutput:
    """The outputs (batch 1, views of one size) concatenated along the views; a field missing in one is None."""
    sizes = {tuple(part.world_points.shape[2:4]) for part in parts}
    if len(sizes) != 1:
        raise ValueError(f"The chunks have views of different sizes {sorted(sizes)}; give all views one size.")
    merged = {}
    for name in parts[0]:
        values = [getattr(part, name) for part in parts]
        merged[name] = torch.cat(values, dim=1) if all(value is not None for value in values) else None
    return G2VLMReconstructionOutput(**merged)


def merge_chunks(chunks: Iterable[ReconstructedChunk]) -> G2VLMReconstructionOutput:
    """One `G2VLMReconstructionOutput` (batch 1) of all views of the chunks, in order."""
    parts = [chunk.reconstruction for chunk in chunks]
    if not parts:
        raise ValueError("No chunks to merge: the view sequence was empty.")
    return merge_outputs(parts)


def reconstruct_chunked(
    model: Any,
    processor: Any,
    views: Iterable,
    chunk_size: int = 32,
    overlap: int = 8,
    loop_closure: bool | LoopClosureConfig = False,
    **kwargs: Any,
) -> G2VLMReconstructionOutput:
    """Reconstruct any number of views in overlapping chunks (see [`stream_reconstruction`] for the arguments) and
    return one output with every view in the first chunk's frame and scale, on the CPU.

    With `loop_closure` (True for the default [`LoopClosureConfig`], or a config), places the sequence revisits are
    found and the chunks are moved by a pose-graph optimisation (see [`close_loops`]); `views` must then be a sequence
    (the views of each loop candidate are read again), and scipy must be installed (`pip install "g2vlm-hf[loop]"`).

    Example:
        ```python
        output = g2vlm_hf.reconstruct_chunked(model, processor, frames, chunk_size=32, overlap=8)
        output.camera_poses.shape  # (1, len(frames), 4, 4)
        closed = g2vlm_hf.reconstruct_chunked(model, processor, frames, loop_closure=True)
        ```
    """
    check_view_iterable(views)
    if not loop_closure:
        return merge_chunks(stream_reconstruction(model, processor, views, chunk_size, overlap, **kwargs))
    config = loop_closure if isinstance(loop_closure, LoopClosureConfig) else LoopClosureConfig()
    if not isinstance(views, Sequence):
        raise ValueError(
            "Loop closure reads the views of each loop candidate again: pass `views` as a sequence (a list of images "
            f"or paths), not a {type(views).__name__}."
        )
    require_scipy()  # before the model runs
    max_points = kwargs.pop("max_alignment_points", 20_000)
    total_views = kwargs.pop("total_views", None)
    chunks = list(stream_reconstruction(model, processor, views, chunk_size, overlap, total_views, max_points, True,
                                        **kwargs))  # fmt: skip
    closed, _ = close_loops(model, processor, views, chunks, config, max_points, **kwargs)
    return merge_chunks(closed)


__all__ = [
    "ChunkAligner",
    "ClosedLoop",
    "LoopClosureConfig",
    "ReconstructedChunk",
    "close_loops",
    "merge_chunks",
    "plan_chunks",
    "reconstruct_chunked",
    "stream_reconstruction",
    "transform_reconstruction",
]
