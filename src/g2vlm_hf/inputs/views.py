"""The views of one scene as a command gets them (image files, a folder, or a video), known by count and name before
any pixel is decoded, and read lazily, one view at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import InputError
from .images import images_in_folder
from .video import count_video_frames, frame_name, iter_video_frames, uniform_indices

DEFAULT_VIDEO_EVERY = 10
"""One frame in this many of a video is a view unless `every` says otherwise (neighbouring frames add time, not
coverage)."""


@dataclass(frozen=True)
class ViewSource:
    """The views of one scene, not yet read.

    Attributes:
        names: Each view's name (file name, or `video.mp4#frameN`), in order; `len(names)` views will be read.
        read: Yields the views as RGB PIL images, lazily, in order (a fresh pass at each call).
        description: What the views are, for messages ("image files", "frames of walk.mp4, one in 5").
    """

    names: list[str]
    read: Callable[[], Iterator[Image.Image]]
    description: str

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Image.Image]:
        return self.read()

    def loaded(self) -> ViewSource:
        """The same views read now, all at once (errors of unreadable views raised here), then served from memory."""
        from transformers.utils import logging

        with logging.tqdm(self.read(), total=len(self), desc="Reading views", unit="view") as bar:
            views = list(bar)  # the bar is closed before an error is printed
        return ViewSource(self.names, lambda: iter(views), self.description)

    def check_at_most(self, limit: int, advice: str) -> None:
        """Refuse more than `limit` views, naming them and `advice` (what to do instead)."""
        if len(self) > limit:
            raise InputError(f"{len(self)} views ({self.description}) are more than {limit}: {advice}")


def image_views(paths: Sequence[Path | str], every: int = 1, max_views: int | None = None) -> ViewSource:
    """Views read from image files (EXIF orientation applied), named by their file names: every `every`-th of them
    (at most `max_views`); when the files are several, fewer than two kept are refused as for a video."""
    from ..processing.image_io import load_image

    paths = [Path(path) for path in paths]
    if not paths:
        raise InputError("No image files were given.")
    for path in paths:
        if path.is_dir():
            raise InputError(
                f"{path} is a folder, not an image file (`g2vlm reconstruct --folder` takes a folder of views)."
            )
    absent = [str(path) for path in paths if not path.is_file()]
    if absent:
        raise InputError(f"Image file(s) not found: {', '.join(absent)}.")
    kept = paths[:: _check_every(every, max_views)][:max_views]
    _check_kept(len(kept), len(paths), every, max_views, f"the {len(paths)} image files")
    return ViewSource(
        [path.name for path in kept],
        lambda: (load_image(path) for path in kept),
        "image files" + (f", one in {every}" if every > 1 else ""),
    )


def folder_views(folder: Path, every: int = 1, max_views: int | None = None) -> ViewSource:
    """Views read from the image files of `folder`, sorted by name: every `every`-th of them (at most `max_views`)."""
    return image_views(images_in_folder(folder), every, max_views)


def _check_every(every: int, max_views: int | None) -> int:
    """`every` when it and `max_views` are valid (at least 1, as their flags say)."""
    if every < 1:
        raise InputError(f"--every must be at least 1, got {every}.")
    if max_views is not None and max_views < 1:
        raise InputError(f"--max-views must be at least 1, got {max_views}.")
    return every


def _check_kept(kept: int, total: int, every: int, max_views: int | None, what: str, min_views: int = 2) -> None:
    """Refuse a subsampling that leaves fewer than `min_views` of `total` views (a scene of one view is not what a
    sequence is given for), unless there was only one view or `max_views` asks for fewer."""
    if total > 1 and kept < min(min_views, max_views or min_views):
        raise InputError(
            f"--every {every} keeps {kept} of {what}; a reconstruction needs at least {min_views} views: use a "
            f"smaller --every (at most {total - 1})."
        )


def video_views(video: Path, every: int = 1, max_views: int | None = None, min_views: int = 2) -> ViewSource:
    """Views read from every `every`-th frame of `video` (at most `max_views`), counted from the video's packets
    without decoding; fewer than `min_views` kept frames are refused (a video is not meant to give a one-view scene
    unless `max_views` asks for one)."""
    total = count_video_frames(video)
    kept = math.ceil(total / _check_every(every, max_views))
    kept = kept if max_views is None else min(kept, max_views)
    if total <= 1 and kept < min(min_views, max_views or min_views):
        raise InputError(
            f"{video} holds a single frame; a reconstruction from a video needs at least {min_views} views."
        )
    _check_kept(kept, total, every, max_views, f"the {total} frames of {video}", min_views)
    return ViewSource(
        [frame_name(video, index * every) for index in range(kept)],
        lambda: iter_video_frames(video, every, kept),
        f"frames of {video}" + (f", one in {every}" if every > 1 else ""),
    )


def video_frames(video: Path, every: int = 1, max_frames: int | None = None) -> list[Image.Image]:
    """Every `every`-th frame of `video` (at most `max_frames`) as upright PIL images, in a list; fewer than two are
    refused unless `max_frames` asks for one (see [`video_views`])."""
    return list(video_views(video, every, max_frames))


def spread_video_views(video: Path, count: int) -> ViewSource:
    """`count` frames of `video` spread uniformly over its length (first and last included), e.g. to ask about it."""
    if count < 1:
        raise InputError(f"--views must be at least 1, got {count}.")
    chosen = uniform_indices(count_video_frames(video), count)
    return ViewSource(
        [frame_name(video, index) for index in chosen],
        lambda: iter_video_frames(video, indices=chosen),
        f"frames of {video}",
    )


def open_views(
    images: Sequence[Path | str] = (),
    folder: Path | None = None,
    video: Path | None = None,
    every: int | None = None,
    max_views: int | None = None,
) -> ViewSource:
    """The views given as image files, or a folder, or a video (exactly one of them): every `every`-th of them
    (default: one in 10 of a video's frames, every image), at most `max_views`."""
    if sum([bool(images), folder is not None, video is not None]) != 1:
        raise InputError("Give the views as image files, or --folder DIR, or --video FILE (exactly one of them).")
    if video is not None:
        return video_views(video, DEFAULT_VIDEO_EVERY if every is None else every, max_views)
    every = 1 if every is None else every
    return folder_views(folder, every, max_views) if folder is not None else image_views(images, every, max_views)


__all__ = [
    "ViewSource",
    "folder_views",
    "image_views",
    "open_views",
    "spread_video_views",
    "video_frames",
    "video_views",
]
