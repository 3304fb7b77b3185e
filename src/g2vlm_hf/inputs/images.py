"""Image files and folders of views, and the sizes of views as displayed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import InputError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) taken as images in a folder of views."""

UNREAD_PHOTO_SUFFIXES = (
    ".arw",
    ".avif",
    ".cr2",
    ".cr3",
    ".dng",
    ".heic",
    ".heif",
    ".jxl",
    ".nef",
    ".orf",
    ".raf",
    ".rw2",
)
"""Photo formats a folder of views may hold that are not read (phones' HEIC, camera raw files): named when left out,
so that a folder of iPhone photos is not silently a smaller scene."""


def is_image_file(path: Path) -> bool:
    """Whether `path`'s suffix is one of `IMAGE_SUFFIXES` (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def images_in_folder(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted by name; refuses a missing folder and one without images, and names the
    photos left out because their format is not read (`UNREAD_PHOTO_SUFFIXES`: a warning, or in the error)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    entries = sorted(path for path in folder.iterdir() if path.is_file())
    files = [path for path in entries if is_image_file(path)]
    unread = [path.name for path in entries if path.suffix.lower() in UNREAD_PHOTO_SUFFIXES]
    advice = (
        f"{len(unread)} photo(s) in a format that is not read ({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}"
        "): convert them to JPEG or PNG to use them"
    )
    if not files:
        raise InputError(
            f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})" + (f"; {advice}." if unread else ".")
        )
    if unread:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(f"{folder}: {len(files)} image files are used and {advice}.")
    return files


def original_sizes(views: Sequence) -> list[tuple[int, int]]:
    """`(height, width)` of each view as given (PIL images, paths or arrays), as displayed (EXIF orientation)."""
    from PIL import Image

    from ..processing.image_io import displayed_size, load_image

    sizes = []
    for view in views:
        if isinstance(view, Image.Image):
            sizes.append((view.height, view.width))
        elif isinstance(view, (str, Path)):
            width, height = displayed_size(view)
            sizes.append((height, width))
        else:
            image = load_image(view)
            sizes.append((image.height, image.width))
    return sizes


__all__ = ["IMAGE_SUFFIXES", "UNREAD_PHOTO_SUFFIXES", "images_in_folder", "is_image_file", "original_sizes"]
