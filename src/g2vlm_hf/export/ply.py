"""Coloured point clouds as binary PLY files (through trimesh, the `export` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes_atomic
from .validation import ArrayLike, validate_cloud

__all__ = ["encode_point_cloud_ply", "require_trimesh", "save_point_cloud_ply"]


def require_trimesh() -> Any:
    """The `trimesh` module, or an `ImportError` saying how to install it."""
    try:
        import trimesh
    except ImportError as error:
        raise ImportError(
            'Exporting point clouds and GLB scenes needs trimesh: pip install "g2vlm-hf[export]"'
        ) from error
    return trimesh


def encode_point_cloud_ply(points: np.ndarray, colours: np.ndarray) -> bytes:
    """The PLY bytes of a checked cloud (see [`validate_cloud`])."""
    return require_trimesh().PointCloud(points, colors=colours).export(file_type="ply", encoding="binary")


def save_point_cloud_ply(path: str | os.PathLike[str], points: ArrayLike, colours: ArrayLike) -> Path:
    """Saves a coloured point cloud as a binary little-endian PLY (float32 x/y/z, uchar red/green/blue/alpha).

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        points (`(M, 3)` float): Finite 3D points.
        colours (`(M, 3)` uint8): RGB colour of each point.

    Returns:
        `Path`: The written file.

    Raises:
        ValueError: On bad shapes, dtypes or non-finite points.
        ImportError: When trimesh is not installed.
    """
    require_trimesh()
    return write_bytes_atomic(path, encode_point_cloud_ply(*validate_cloud(points, colours)))
