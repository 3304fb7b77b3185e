"""Video frames read lazily with PyAV: one decoded frame in memory at a time, whatever the video's length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image


def _open(video: Path):
    try:
        import av
    except ImportError as error:
        raise ImportError('Reading videos needs PyAV: pip install "g2vlm-hf[video]"') from error
    if not Path(video).is_file():
        raise FileNotFoundError(f"Video file {video} does not exist.")
    try:
        return av.open(str(video))
    except av.FFmpegError as error:
        raise ValueError(f"Cannot open {video} as a video: {error}") from error


def count_video_frames(video: Path) -> int:
    """The number of frames of `video`'s first video stream, counted from its packets (nothing is decoded)."""
    import av

    with _open(video) as container:
        if not container.streams.video:
            raise ValueError(f"{video} has no video stream.")
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as error:
            raise ValueError(f"Cannot read {video}: {error}") from error


def iter_video_frames(
    video: Path, every: int = 1, max_frames: int | None = None, indices: Sequence[int] | None = None
) -> Iterator[Image.Image]:
    """Yield every `every`-th frame of `video` as an RGB PIL image (frames 0, every, 2 x every, ...), at most
    `max_frames` of them, or, with `indices`, exactly the frames of those (sorted) numbers. Raises a ValueError when
    the video cannot be decoded or yields no frame."""
    import av

    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}.")
    wanted = None if indices is None else sorted(set(indices))
    produced = 0
    with _open(video) as container:
        if not container.streams.video:
            raise ValueError(f"{video} has no video stream.")
        try:
            for number, frame in enumerate(container.decode(video=0)):
                if wanted is not None:
                    if number not in wanted:
                        continue
                elif number % every:
                    continue
                yield frame.to_image()
                produced += 1
                if produced == (len(wanted) if wanted is not None else max_frames):
                    break
        except av.FFmpegError as error:
            raise ValueError(f"Cannot decode {video}: {error}") from error
    if produced == 0:
        raise ValueError(f"{video} holds no video frames.")
    if wanted is not None and produced < len(wanted):
        raise ValueError(f"{video} has no frames {wanted[produced:]}: it ended first.")


def uniform_indices(count: int, chosen: int) -> list[int]:
    """`chosen` indices spread evenly over `range(count)`, first and last included (all of them if `count` is
    smaller)."""
    if count <= chosen:
        return list(range(count))
    if chosen == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (chosen - 1)) for i in range(chosen)})


__all__ = ["count_video_frames", "iter_video_frames", "uniform_indices"]
