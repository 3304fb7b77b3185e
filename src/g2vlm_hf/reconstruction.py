"""Reconstructing the views of one scene for the command line: in one pass (at most the processor's `max_views`), or
in overlapping chunks (`chunked.stream_reconstruction`, any number of views, read lazily) handed to a
`StreamingSceneWriter` as each is aligned. Also the few views a question about a chunked scene is asked on."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .chunked import close_loops, stream_reconstruction
from .export.streaming import StreamingSceneWriter
from .inputs import ViewSource
from .modeling.outputs import G2VLMReconstructionOutput
from .view_selection import choose_views


@dataclass
class SceneRun:
    """A scene reconstructed in one pass, as the exports need it.

    Attributes:
        output: The model's output (batch 1).
        geometry_pixel_values: `(1, N, 3, H, W)` the views as the processor made them (to colour the exports).
        original_sizes: `(height, width)` of each view as read.
        names: Each view's name (file name or video frame).
        views: The views as read (a question is asked on all of them).
    """

    output: G2VLMReconstructionOutput
    geometry_pixel_values: torch.Tensor
    original_sizes: list[tuple[int, int]]
    names: list[str]
    views: list[Image.Image]


def reconstruct_in_one_pass(model, processor, source: ViewSource, **processor_kwargs) -> SceneRun:
    """Read every view of `source` and reconstruct them together in one model pass."""
    views = list(source)
    inputs = processor(geometry_images=views, return_tensors="pt", **processor_kwargs).to(model.device)
    with torch.inference_mode():
        output = model.reconstruct(**inputs)
    sizes = [(view.height, view.width) for view in views]
    return SceneRun(output, inputs["geometry_pixel_values"], sizes, list(source.names), views)


def stream_in_chunks(
    model,
    processor,
    source: ViewSource,
    writer: StreamingSceneWriter,
    chunk_size: int,
    overlap: int,
    loop_closure: bool = False,
    **processor_kwargs,
) -> None:
    """Reconstruct `source` with `chunk_size` views per pass, each chunk sharing `overlap` views with the previous,
    reading the views lazily, and hand each aligned chunk to `writer` (its files are written as it arrives; host
    memory is one chunk and the writer's point budget).

    With `loop_closure`, every chunk is kept until the loops are closed (`chunked.close_loops`; memory then grows
    with the number of views), the views of loop candidates are read again from `source`, and the moved chunks go to
    `writer` at the end."""
    sizes: dict[int, tuple[int, int]] = {}  # of the views read but not yet written

    def recorded():
        for index, view in enumerate(source):
            sizes[index] = (view.height, view.width)
            yield view

    stream = stream_reconstruction(
        model, processor, recorded(), chunk_size, overlap, total_views=len(source), describe_views=loop_closure,
        **processor_kwargs,
    )  # fmt: skip
    if loop_closure:
        stream, _ = close_loops(model, processor, RereadViews(source), list(stream), **processor_kwargs)
    geometry = processor.geometry_image_processor
    for chunk in stream:
        chunk_sizes = [sizes.pop(index) for index in chunk.view_indices]
        names = [source.names[index] for index in chunk.view_indices]
        writer.add_chunk(chunk, geometry, original_sizes=chunk_sizes, view_names=names)
        del chunk
        release_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the memory freed by a chunk back to the system (glibc's `malloc_trim`; nothing elsewhere).

    Each chunk's large arrays are freed once written, but the small records kept between them (poses, file names)
    pin glibc's heap: without a trim, the process's RSS grew by about 0.25 MB per 112x112 view (measured), that is,
    with the number of views, although nothing of the views is kept."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class RereadViews(Sequence):
    """The views of a source indexed for loop closure, which reads a few places again: a miss re-reads the source from
    the start and keeps the `window` views from the one asked for (a place's views are asked for in order)."""

    def __init__(self, source: ViewSource, window: int = 64):
        self.source, self.window, self.cache = source, window, {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Image.Image:
        if index not in self.cache:
            self.cache = dict(read_views(self.source, range(index, min(index + self.window, len(self.source)))))
        return self.cache[index]


def read_views(source: ViewSource, indices: Iterable[int]) -> list[tuple[int, Image.Image]]:
    """The views of `source` at `indices`, read in one pass that stops after the last of them, with their indices."""
    wanted = set(indices)
    last = max(wanted, default=-1)
    chosen = []

    def scan():
        yield from source.read()

    with contextlib.closing(scan()) as views:  # a video is closed as soon as its last wanted frame is read
        for index, view in enumerate(views):
            if index in wanted:
                chosen.append((index, view))
            if index >= last:
                break
    return chosen


def views_for_question(
    source: ViewSource, camera_poses: np.ndarray, count: int, by: str
) -> tuple[list[Image.Image], list[str]]:
    """The `count` views of a chunked run a question is asked on (chosen `by` "coverage" of the cameras or "uniform"
    over the sequence, `view_selection.choose_views`), read again from `source`, and their names."""
    chosen = choose_views(camera_poses, count, by)
    views = [view for _, view in read_views(source, chosen)]
    return views, [source.names[index] for index in chosen]


__all__ = ["SceneRun", "reconstruct_in_one_pass", "stream_in_chunks", "views_for_question"]
