"""Image files and folders of views, and the sizes of views as displayed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import InputError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) taken as images in a folder of views."""


def is_image_file(path: Path) -> bool:
    """Whether `path`'s suffix is one of `IMAGE_SUFFIXES` (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def images_in_folder(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted by name; refuses a missing folder and one without images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.")
    files = sorted(path for path in folder.iterdir() if path.is_file() and is_image_file(path))
    if not files:
        raise InputError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
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


__all__ = ["IMAGE_SUFFIXES", "images_in_folder", "is_image_file", "original_sizes"]
