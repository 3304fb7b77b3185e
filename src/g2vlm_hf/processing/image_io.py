"""Reading user images into 8-bit RGB PIL images, with clear errors for what cannot be read."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Largest image (in pixels) that is decoded; a header claiming more is refused before decoding (Pillow's own
# decompression-bomb guard raises at twice its MAX_IMAGE_PIXELS, about 179 megapixels).
MAX_IMAGE_PIXELS = 100_000_000

ImageSource = str | os.PathLike | Image.Image | np.ndarray


def load_image(source: ImageSource) -> Image.Image:
    """Return `source` as an 8-bit RGB PIL image.

    Accepted: a path, a PIL image or a `(H, W)`, `(H, W, 3)` or `(H, W, 4)` array (uint8, uint16, or float in [0, 1]).
    Conversions: the EXIF orientation is applied (the image as viewers display it, as transformers' `load_image`);
    grayscale is replicated to three channels; an alpha channel is composited onto white; 16-bit images are scaled
    to 8 bits (value / 257), and floating-point images ("F") with values in [0, 1] by 255; palette images are
    expanded. http(s) URLs are fetched with transformers.
    """
    if is_url(source):
        source = _fetch_url(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not an image file: pass the image files in it.")
        if not path.is_file():
            raise ValueError(f"Image file {path} does not exist.")
        try:
            with Image.open(path) as opened:
                _check_pixels(opened.size, str(path))
                if getattr(opened, "n_frames", 1) > 1:
                    logger.warning(f"{path} has {opened.n_frames} frames (animated); using the first frame only.")
                opened.load()
                image = opened.copy()
        except Image.DecompressionBombError as error:
            raise ValueError(f"{path} is too large to decode safely ({error}); downscale it first.") from error
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{path} is not an image that Pillow can read ({error}).") from error
    elif isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source)
    else:
        raise ValueError(
            f"Cannot use an object of type {type(source).__name__} as an image: pass a path, a PIL image or a "
            "numpy array."
        )
    image = apply_exif_orientation(image)
    _check_pixels(image.size, "The image")
    return to_rgb(image)


EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that swap width and height (90 or 270 degree turns, with or without a mirror)."""


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of `image` (1, upright, when absent or unreadable)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (ValueError, TypeError, OSError, SyntaxError):  # a damaged EXIF block: show the pixels as stored
        return 1


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says (a phone photo stored sideways comes out upright)."""
    if exif_orientation(image) in (1, 0):
        return image
    return ImageOps.exif_transpose(image)


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """`(width, height)` of the image file at `path` as displayed (EXIF orientation applied), read from its header
    without decoding the pixels."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if exif_orientation(opened) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not an image that Pillow can read ({error}).") from error
    return width, height


URL_TIMEOUT_S = 30.0
"""Seconds to wait for an image URL to answer (transformers' `load_image` waits forever by default)."""


def is_url(source: object) -> bool:
    """Whether `source` is an http(s) URL (read over the network rather than as a file path)."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def _fetch_url(url: str) -> Image.Image:
    """The image at `url`, fetched the way transformers' processors fetch image URLs."""
    from transformers.image_utils import load_image as transformers_load_image

    try:
        return transformers_load_image(url, timeout=URL_TIMEOUT_S)
    except Exception as error:  # network errors, HTTP error pages, undecodable bytes
        raise ValueError(f"Could not read an image from {url} ({type(error).__name__}: {error}).") from error


def _check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse empty images and images over `MAX_IMAGE_PIXELS` with a clear error."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{name} is empty ({width}x{height} pixels).")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name} is {width}x{height} = {width * height:,} pixels, too large (the limit is {MAX_IMAGE_PIXELS:,} "
            "pixels, g2vlm_hf.processing.image_io.MAX_IMAGE_PIXELS); downscale it first."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB version of a PIL image of any mode (see `load_image` for the conversions)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        brightest = values.max(initial=0)
        # float images in [0, 1] (as float arrays are read), else 8- or 16-bit values
        peak = 1.0 if image.mode == "F" and brightest <= 1.0 else 65535.0 if brightest > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(values * 255.0 / peak), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"An image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"The image array is empty (shape {array.shape}).")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("A float image array must hold finite values in [0, 1].")
        array = np.rint(array * 255.0).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"Unsupported image array dtype {array.dtype}: use uint8, uint16 or float in [0, 1].")
    return Image.fromarray(array)
