"""Depth maps as 16-bit PNGs that keep their values (codec: save and load) and as colour-mapped previews."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .atomic import write_bytes_atomic
from .validation import ArrayLike, check_shape, to_numpy

__all__ = [
    "colourise_depth",
    "encode_depth_png16",
    "encode_depth_preview",
    "load_depth_png16",
    "save_depth_png16",
    "save_depth_preview",
]

#: Largest uint16 code of a valid depth pixel; code 0 marks invalid depth.
DEPTH_CODE_MAX = 65535


def encode_depth_png16(depth: ArrayLike) -> tuple[bytes, tuple[float, float] | None]:
    """The PNG bytes of [`save_depth_png16`] and the `(depth_min, depth_max)` they hold (None: no valid pixel)."""
    values = to_numpy(depth, "depth").astype(np.float64)
    check_shape(values, "depth", "(H, W)", 2)
    valid = np.isfinite(values) & (values > 0.0)
    codes = np.zeros(values.shape, dtype=np.uint16)
    depth_range = None
    if valid.any():
        low, high = float(values[valid].min()), float(values[valid].max())
        span = high - low
        scaled = (values[valid] - low) / span if span > 0.0 else np.zeros(int(valid.sum()))
        codes[valid] = (1 + np.rint(scaled * (DEPTH_CODE_MAX - 1))).astype(np.uint16)
        depth_range = (low, high)
    info = PngImagePlugin.PngInfo()
    info.add_text("depth_min", repr(depth_range[0]) if depth_range else "nan")
    info.add_text("depth_max", repr(depth_range[1]) if depth_range else "nan")
    info.add_text(
        "depth_encoding", "0 = invalid; v in 1..65535 -> depth_min + (v - 1) / 65534 * (depth_max - depth_min)"
    )
    buffer = io.BytesIO()
    Image.fromarray(codes).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue(), depth_range


def save_depth_png16(path: str | os.PathLike[str], depth: ArrayLike) -> tuple[float, float] | None:
    """Saves one view's depth as a 16-bit grayscale PNG (Pillow mode `"I;16"`), scaled to that view's valid range.

    Valid depth (finite and positive) in `[depth_min, depth_max]` maps linearly to the codes `1..65535`; invalid depth
    is written as 0. The range is stored in the PNG's text chunks `depth_min` and `depth_max` (Python float `repr`,
    `"nan"` when no pixel is valid), so [`load_depth_png16`] recovers the depth to within half a quantisation step,
    `(depth_max - depth_min) / 65534 / 2`.

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        depth (`(H, W)` float): Depth of one view.

    Returns:
        `tuple[float, float]` or None: The `(depth_min, depth_max)` written, None when no pixel is valid.

    Raises:
        ValueError: When `depth` is not 2-D.
    """
    data, depth_range = encode_depth_png16(depth)
    write_bytes_atomic(path, data)
    return depth_range


def load_depth_png16(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a depth PNG written by [`save_depth_png16`].

    Args:
        path (`str` or `os.PathLike`): The PNG file.

    Returns:
        `(H, W)` float64 depth, NaN where the depth was invalid.

    Raises:
        ValueError: When the PNG has no `depth_min`/`depth_max` text chunks.
    """
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}))
        codes = np.array(image).astype(np.float64)
    if "depth_min" not in text or "depth_max" not in text:
        raise ValueError(f"{path} has no depth_min/depth_max text chunks; was it written by save_depth_png16?")
    low, high = float(text["depth_min"]), float(text["depth_max"])
    depth = low + (codes - 1.0) / (DEPTH_CODE_MAX - 1) * (high - low)
    depth[codes == 0] = math.nan
    return depth


#: Colour ramp of the depth previews, far (dark blue-violet) to near (light yellow): perceptually ordered and readable
#: by the common colour-vision deficiencies. Linear interpolation between these anchors.
DEPTH_RAMP = np.array(
    [
        [20, 12, 60],
        [62, 38, 140],
        [40, 100, 170],
        [30, 150, 150],
        [70, 190, 100],
        [170, 215, 60],
        [250, 235, 120],
    ],
    dtype=np.float64,
)


def colourise_depth(depth: ArrayLike, *, low_percentile: float = 2.0, high_percentile: float = 98.0) -> np.ndarray:
    """Colour-maps one view's depth for people to look at: near is light yellow, far is dark blue-violet.

    The inverse depth (disparity) is scaled between its `low_percentile` and `high_percentile` over the valid pixels
    (finite, positive depth) and clipped, so a few outliers do not wash the map out. Invalid pixels are black.

    Args:
        depth (`(H, W)` float): Depth of one view.
        low_percentile (`float`, defaults to 2.0), high_percentile (`float`, defaults to 98.0): The disparity
            percentiles mapped to the two ends of the ramp.

    Returns:
        `(H, W, 3)` uint8 RGB.
    """
    values = to_numpy(depth, "depth").astype(np.float64)
    check_shape(values, "depth", "(H, W)", 2)
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(f"need 0 <= low_percentile < high_percentile <= 100, got {low_percentile}, {high_percentile}")
    valid = np.isfinite(values) & (values > 0.0)
    image = np.zeros((*values.shape, 3), dtype=np.uint8)
    if not valid.any():
        return image
    disparity = 1.0 / values[valid]
    low, high = np.percentile(disparity, [low_percentile, high_percentile])
    position = np.clip((disparity - low) / (high - low), 0.0, 1.0) if high > low else np.full_like(disparity, 0.5)
    scaled = position * (len(DEPTH_RAMP) - 1)
    lower = np.minimum(np.floor(scaled).astype(np.int64), len(DEPTH_RAMP) - 2)
    weight = (scaled - lower)[:, None]
    image[valid] = np.rint((1.0 - weight) * DEPTH_RAMP[lower] + weight * DEPTH_RAMP[lower + 1]).astype(np.uint8)
    return image


def encode_depth_preview(depth: ArrayLike) -> bytes:
    """The PNG bytes of [`save_depth_preview`]."""
    buffer = io.BytesIO()
    Image.fromarray(colourise_depth(depth)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_depth_preview(path: str | os.PathLike[str], depth: ArrayLike) -> Path:
    """Saves one view's depth as a colour-mapped 8-bit RGB PNG (see [`colourise_depth`]); a picture, not data: use
    [`save_depth_png16`] for the values."""
    return write_bytes_atomic(path, encode_depth_preview(depth))
