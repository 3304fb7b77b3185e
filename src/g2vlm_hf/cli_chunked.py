"""The chunked path of `g2vlm reconstruct --chunk-size N --overlap K`: views read lazily (image files one at a time,
video frames decoded one at a time), reconstructed in overlapping chunks (`chunked.stream_reconstruction`) and merged
on the CPU for the exports; and the few views a question about a long sequence is asked on."""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .chunked import merge_chunks, stream_reconstruction
from .modeling.outputs import G2VLMReconstructionOutput
from .processing.image_io import load_image
from .video import count_video_frames, iter_video_frames, uniform_indices

# The exports need poses, world points, depth, confidence and intrinsics; dropping the rest as each chunk arrives
# keeps the merged result at about 6 MB per 518x392 view on the host.
UNUSED_BY_EXPORTS = ("local_points", "global_points")


@dataclass
class ChunkedRun:
    """What the exports of a chunked run need: the merged output (batch 1, without local and global points), the
    views' geometry pixels, their original `(height, width)` and their names (file names or video frame numbers)."""

    output: G2VLMReconstructionOutput
    geometry_pixel_values: torch.Tensor
    original_sizes: list[tuple[int, int]]
    names: list[str]


def require_pyav() -> None:
    from .cli import CLIError

    if importlib.util.find_spec("av") is None:
        raise CLIError('Reading videos needs PyAV: pip install "g2vlm-hf[video]"')


def lazy_views(args: argparse.Namespace) -> tuple[Iterable[Image.Image], int | None, Callable[[int], str]]:
    """The views of `args` as a lazy iterable, how many there will be (None if unknown) and each one's name."""
    from .cli import check_one_source, images_in_folder

    check_one_source(args)
    if args.video is not None:
        require_pyav()
        kept = math.ceil(count_video_frames(args.video) / args.every)
        total = kept if args.max_views is None else min(kept, args.max_views)
        frames = iter_video_frames(args.video, args.every, args.max_views)
        return frames, total, lambda index: f"{args.video.name}#frame{index * args.every}"
    paths = images_in_folder(args.folder) if args.folder is not None else [Path(path) for path in args.images]
    return (load_image(path) for path in paths), len(paths), lambda index: paths[index].name


def _recording_sizes(views: Iterable[Image.Image], sizes: list[tuple[int, int]]) -> Iterator[Image.Image]:
    for view in views:
        sizes.append((view.height, view.width))
        yield view


def reconstruct_in_chunks(args: argparse.Namespace, model, processor) -> ChunkedRun:
    """Reconstruct the views of `args` with `args.chunk_size` views per pass and `args.overlap` shared views."""
    views, total, name_of = lazy_views(args)
    sizes: list[tuple[int, int]] = []
    chunks = []
    stream = stream_reconstruction(
        model,
        processor,
        _recording_sizes(views, sizes),
        args.chunk_size,
        args.overlap,
        total_views=total,
        resize_views_to_first=args.resize_views,
    )
    for chunk in stream:
        kept = {name: value for name, value in chunk.reconstruction.items() if name not in UNUSED_BY_EXPORTS}
        chunk.reconstruction = G2VLMReconstructionOutput(**kept)
        chunks.append(chunk)
    if not chunks:
        raise ValueError("No views were given.")
    pixels = torch.cat([chunk.geometry_pixel_values for chunk in chunks], dim=1)
    return ChunkedRun(merge_chunks(chunks), pixels, sizes, [name_of(index) for index in range(len(sizes))])


def views_for_question(run: ChunkedRun, processor, count: int) -> tuple[list[Image.Image], list[str]]:
    """`count` views spread uniformly over the sequence (as geometry-size images) and their names, for `--ask`.

    Uniform in sequence order rather than by pose coverage: it does not depend on the reconstruction being right,
    and along a walk-through it spreads the views over the path."""
    chosen = uniform_indices(run.geometry_pixel_values.shape[1], count)
    pixels = processor.geometry_image_processor.unnormalize(run.geometry_pixel_values[0, chosen])
    return [Image.fromarray(image.numpy()) for image in pixels], [run.names[index] for index in chosen]


def video_views_for_chat(video: Path, count: int) -> tuple[list[Image.Image], list[str]]:
    """`count` frames of `video` spread uniformly over its length (decoded lazily) and their names."""
    require_pyav()
    chosen = uniform_indices(count_video_frames(video), count)
    return list(iter_video_frames(video, indices=chosen)), [f"{video.name}#frame{index}" for index in chosen]


__all__ = ["ChunkedRun", "reconstruct_in_chunks", "video_views_for_chat", "views_for_question"]
