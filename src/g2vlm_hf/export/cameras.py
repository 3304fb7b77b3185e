"""Camera poses (and intrinsics) as a JSON document, `cameras.json`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import json_text, write_bytes_atomic
from .validation import (
    ArrayLike,
    validate_image_size,
    validate_intrinsics,
    validate_original_sizes,
    validate_poses,
    validate_view_names,
)

__all__ = ["encode_cameras_json", "save_cameras_json"]


def _json_matrix(matrix: np.ndarray) -> list:
    """Nested lists, NaN written as None (JSON has no NaN)."""
    return [[None if not math.isfinite(value) else value for value in row] for row in matrix.tolist()]


def encode_cameras_json(
    poses: np.ndarray,
    image_size: tuple[int, int],
    intrinsics: np.ndarray | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    view_names: Sequence[str] | None = None,
) -> bytes:
    """The `cameras.json` bytes (see [`save_cameras_json`]) of checked arrays: poses (see [`validate_poses`]),
    `(height, width)`, intrinsics, original sizes and names for every view."""
    height, width = image_size
    cameras = []
    for index, pose in enumerate(poses):
        camera: dict[str, Any] = {"index": index}
        if view_names is not None:
            camera["name"] = view_names[index]
        camera.update(camera_to_world=pose.tolist(), width=width, height=height)
        if intrinsics is not None:
            camera["intrinsics"] = _json_matrix(intrinsics[index])
        if original_sizes is not None:
            original_height, original_width = original_sizes[index]
            original = {"height": original_height, "width": original_width}
            if intrinsics is not None:
                scale = np.array([[original_width / width], [original_height / height], [1.0]])
                original["intrinsics"] = _json_matrix(intrinsics[index] * scale)
            camera["original"] = original
        cameras.append(camera)
    document = {
        "convention": "camera_to_world; camera frame is OpenCV (x right, y down, z forward)",
        "intrinsics_convention": (
            "[[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels of width x height; the image spans [0, width] x "
            "[0, height] and pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); `original` holds the same "
            "camera in pixels of the image as given (the views are resized, never cropped)"
        ),
        "cameras": cameras,
    }
    return json_text(document).encode("utf-8")


def save_cameras_json(
    path: str | os.PathLike[str],
    camera_poses: ArrayLike,
    image_size: tuple[int, int],
    intrinsics: ArrayLike | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    view_names: Sequence[str] | None = None,
) -> Path:
    """Saves the camera poses (and intrinsics) as JSON.

    The document is `{"convention": str, "intrinsics_convention": str, "cameras": [{"index": int, "name": str (with
    `view_names`), "camera_to_world": 4x4 nested list, "width": int, "height": int, "intrinsics": 3x3 (with
    `intrinsics`), "original": {"width", "height", "intrinsics"} (with `original_sizes`)}, ...]}`, one entry per view
    in view order. Intrinsics a view could not be fitted for hold `null`.

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        image_size (`tuple[int, int]`): `(height, width)` of the views in pixels.
        intrinsics (`(N, 3, 3)` float, *optional*): Pinhole intrinsics in pixels of `image_size`
            (`G2VLMReconstructionOutput.intrinsics[scene]`).
        original_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` of each original image; the
            intrinsics are also written rescaled to them.
        view_names (`list[str]`, *optional*): Each view's name (e.g. its file name), written as the camera's `name`.

    Returns:
        `Path`: The written file.

    Raises:
        ValueError: On bad shapes, non-finite poses or a bad image size.
    """
    poses, image_size = validate_poses(camera_poses), validate_image_size(image_size)
    document = encode_cameras_json(
        poses,
        image_size,
        validate_intrinsics(intrinsics, len(poses)),
        validate_original_sizes(original_sizes, len(poses), image_size),
        validate_view_names(view_names, len(poses)),
    )
    return write_bytes_atomic(path, document)
