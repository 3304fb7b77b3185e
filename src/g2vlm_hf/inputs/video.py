"""Video frames read lazily with PyAV (one decoded frame in memory at a time, whatever the video's length), turned
upright by the video's rotation metadata (the display matrix phones write), as players show them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from .errors import InputError

# counter-clockwise display rotation (degrees) -> the PIL transpose showing the frame as players do
_UPRIGHT = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def require_pyav():
    """The `av` module (PyAV); raises an InputError naming the extra to install when it cannot be imported."""
    try:
        import av
    except ImportError as error:
        raise InputError(f'Reading videos needs PyAV: pip install "g2vlm-hf[video]" ({error})') from error
    return av


def frame_name(video: Path, index: int) -> str:
    """How frame `index` (counted from 0 over all the video's frames) of `video` is called in outputs and messages."""
    return f"{Path(video).name}#frame{index}"


def _open(video: Path):
    """`video` opened with PyAV, refusing a missing file, an unreadable one and one without a video stream."""
    av = require_pyav()
    if not Path(video).is_file():
        raise InputError(f"Video file {video} does not exist.")
    try:
        container = av.open(str(video))
    except av.FFmpegError as error:
        raise InputError(f"Cannot open {video} as a video: {error}") from error
    if not container.streams.video:
        container.close()
        raise InputError(f"{video} has no video stream (an audio-only file?); give a video with picture frames.")
    return container


def count_video_frames(video: Path) -> int:
    """The number of frames of `video`'s first video stream, counted from its packets (nothing is decoded)."""
    av = require_pyav()

    with _open(video) as container:
        try:
            return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)
        except av.FFmpegError as error:
            raise InputError(f"Cannot read {video}: {error}") from error


def upright(frame) -> Image.Image:
    """A decoded PyAV frame as an RGB PIL image, turned by its display rotation (a multiple of 90 degrees)."""
    image = frame.to_image()
    turn = _UPRIGHT.get(round(frame.rotation / 90) * 90 % 360)
    return image if turn is None else image.transpose(turn)


def iter_video_frames(
    video: Path, every: int = 1, max_frames: int | None = None, indices: Sequence[int] | None = None
) -> Iterator[Image.Image]:
    """Yield every `every`-th frame of `video` upright as an RGB PIL image (frames 0, every, 2 x every, ...), at most
    `max_frames` of them, or, with `indices`, exactly the frames of those numbers. Raises an InputError when the video
    cannot be decoded or yields no frame."""
    av = require_pyav()

    if every < 1:
        raise InputError(f"every must be at least 1, got {every}.")
    wanted = None if indices is None else sorted(set(indices))
    produced = 0
    with _open(video) as container:
        try:
            for number, frame in enumerate(container.decode(container.streams.video[0])):
                if (number not in wanted) if wanted is not None else number % every:
                    continue
                yield upright(frame)
                produced += 1
                if produced == (len(wanted) if wanted is not None else max_frames):
                    break
        except av.FFmpegError as error:
            raise InputError(f"Cannot decode {video}: {error}") from error
    if produced == 0:
        raise InputError(f"{video} holds no video frames.")
    if wanted is not None and produced < len(wanted):
        raise InputError(f"{video} has no frames {wanted[produced:]}: it ended first.")


def uniform_indices(count: int, chosen: int) -> list[int]:
    """`chosen` indices spread evenly over `range(count)`, first and last included (all of them if `count` is
    smaller)."""
    if count <= chosen:
        return list(range(count))
    if chosen == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (chosen - 1)) for i in range(chosen)})


__all__ = ["count_video_frames", "frame_name", "iter_video_frames", "require_pyav", "uniform_indices", "upright"]
