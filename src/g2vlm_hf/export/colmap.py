"""Writing one scene's reconstruction as a COLMAP sparse model (text format), for tools that start from COLMAP
(Gaussian splatting, NeRF trainers, COLMAP's own GUI and bundle adjuster).

Files, in `output_dir`:

- `cameras.txt`: one `PINHOLE` camera per view (`fx fy cx cy` from the fitted intrinsics, in pixels of the geometry
  views);
- `images.txt`: one image per view (views whose fitted camera is unusable, i.e. non-finite or with a focal length
  <= 0, are left out with a warning, and so are their points; IMAGE_ID and CAMERA_ID are the view index + 1) with its WORLD-TO-CAMERA pose (COLMAP's convention: quaternion `qw qx qy qz` and
  translation of `x_cam = R x_world + t`; our poses are camera-to-world, so they are inverted here) and its 2D
  observations;
- `points3D.txt`: the kept points (finite, and above the confidence percentile) with their colour, each observed once,
  at the pixel it was predicted for; its `ERROR` is the reprojection error of that pixel through the fitted camera;
- `images/view_000.png`, ...: the views at the geometry resolution, the images the cameras and 2D points refer to.

Pixel coordinates follow COLMAP: the centre of the top-left pixel is `(0.5, 0.5)`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
from PIL import Image
from transformers.processing_utils import Unpack
from transformers.utils import logging

from .atomic import write_all_or_nothing
from .points import confidence_mask, subsample
from .validation import ArrayLike, SceneArrays, check_scene, validate_image_names

logger = logging.get_logger(__name__)

__all__ = ["ColmapExportOptions", "NoUsableCameraError", "export_colmap", "rotation_to_quaternion", "write_colmap"]


class NoUsableCameraError(ValueError):
    """No view has a usable pinhole camera (finite intrinsics with positive focal lengths), so there is no COLMAP
    model to write; the rest of the export does not depend on the cameras."""

    def __init__(self) -> None:
        super().__init__(
            "No view has a usable pinhole camera (finite intrinsics with positive focal lengths); the point maps do "
            "not look like a pinhole camera's"
        )


def rotation_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion `(w, x, y, z)` with `w >= 0` of a 3x3 rotation matrix (Hamilton convention, as COLMAP and
    Eigen use: `rotation` rotates column vectors). Picks the numerically largest of the four components first, so
    it is accurate for every rotation, including half turns."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    candidates = np.array([trace, m[0, 0], m[1, 1], m[2, 2]])
    largest = int(np.argmax(candidates))
    if largest == 0:
        w = 0.5 * np.sqrt(max(1.0 + trace, 0.0))
        quaternion = np.array(
            [w, (m[2, 1] - m[1, 2]) / (4 * w), (m[0, 2] - m[2, 0]) / (4 * w), (m[1, 0] - m[0, 1]) / (4 * w)]
        )
    elif largest == 1:
        x = 0.5 * np.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 0.0))
        quaternion = np.array(
            [(m[2, 1] - m[1, 2]) / (4 * x), x, (m[0, 1] + m[1, 0]) / (4 * x), (m[0, 2] + m[2, 0]) / (4 * x)]
        )
    elif largest == 2:
        y = 0.5 * np.sqrt(max(1.0 - m[0, 0] + m[1, 1] - m[2, 2], 0.0))
        quaternion = np.array(
            [(m[0, 2] - m[2, 0]) / (4 * y), (m[0, 1] + m[1, 0]) / (4 * y), y, (m[1, 2] + m[2, 1]) / (4 * y)]
        )
    else:
        z = 0.5 * np.sqrt(max(1.0 - m[0, 0] - m[1, 1] + m[2, 2], 0.0))
        quaternion = np.array(
            [(m[1, 0] - m[0, 1]) / (4 * z), (m[0, 2] + m[2, 0]) / (4 * z), (m[1, 2] + m[2, 1]) / (4 * z), z]
        )
    quaternion /= np.linalg.norm(quaternion)
    return -quaternion if quaternion[0] < 0 else quaternion


def number_text(value: float) -> str:
    """Shortest exact text of a float (numpy scalars included)."""
    return repr(float(value))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def usable_cameras(intrinsics: np.ndarray | None) -> np.ndarray:
    """Per view: finite intrinsics with positive focal lengths (all False without intrinsics)."""
    if intrinsics is None:
        return np.zeros(0, dtype=bool)
    return np.isfinite(intrinsics).all(axis=(1, 2)) & (intrinsics[:, 0, 0] > 0) & (intrinsics[:, 1, 1] > 0)


def checked_usable_cameras(intrinsics: np.ndarray) -> np.ndarray:
    """[`usable_cameras`] of the views a COLMAP model is written for: raises NoUsableCameraError when there is none,
    warns about the views left out."""
    usable = usable_cameras(intrinsics)
    if not usable.any():
        raise NoUsableCameraError()
    if not usable.all():
        logger.warning(
            f"Views {np.flatnonzero(~usable).tolist()} have no usable pinhole camera (non-finite intrinsics or "
            "a focal length <= 0); they and their points are left out of the COLMAP model"
        )
    return usable


def reprojection_errors(
    poses: np.ndarray,
    intrinsics: np.ndarray,
    xyz: np.ndarray,
    view_of: np.ndarray,
    row_of: np.ndarray,
    column_of: np.ndarray,
) -> np.ndarray:
    """Distance in pixels between each point's pixel centre and its projection through its view's camera (-1, COLMAP's
    "unknown", where it cannot be computed): the `ERROR` of points3D.txt."""
    rotation, translation = poses[view_of, :3, :3], poses[view_of, :3, 3]
    local = np.einsum("nji,nj->ni", rotation, xyz - translation)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsics[view_of, 0, 0] * local[:, 0] / local[:, 2] + intrinsics[view_of, 0, 2]
        v = intrinsics[view_of, 1, 1] * local[:, 1] / local[:, 2] + intrinsics[view_of, 1, 2]
    error = np.hypot(u - (column_of + 0.5), v - (row_of + 0.5))
    return np.where(np.isfinite(error), error, -1.0)


def cameras_text(intrinsics: np.ndarray, usable: np.ndarray, width: int, height: int) -> str:
    """`cameras.txt`: one PINHOLE camera per usable view, numbered by view (1-based), in pixels of `width x height`."""
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines.append(f"# Number of cameras: {int(usable.sum())}")
    for index in np.flatnonzero(usable):
        fx, fy, cx, cy = (
            number_text(intrinsics[index, row, column]) for row, column in ((0, 0), (1, 1), (0, 2), (1, 2))
        )
        lines.append(f"{index + 1} PINHOLE {width} {height} {fx} {fy} {cx} {cy}")
    return "\n".join(lines) + "\n"


class ColmapExportOptions(TypedDict, total=False):
    """The options of [`write_colmap`], for [`export_colmap`] that forwards them (typed so that editors complete them)."""

    image_names: Sequence[str] | None
    write_images: bool
    confidence_percentile: float | None
    max_points: int | None
    seed: int


def export_colmap(
    output_dir: str | os.PathLike[str],
    *,
    camera_poses: ArrayLike,
    world_points: ArrayLike,
    intrinsics: ArrayLike,
    images: ArrayLike,
    confidence: ArrayLike | None = None,
    **options: Unpack[ColmapExportOptions],
) -> list[Path]:
    """Writes one scene as a COLMAP text model: [`check_scene`] of the arrays, then [`write_colmap`].

    Args:
        output_dir (`str` or `os.PathLike`): Destination folder, created if missing; files of the same names are
            replaced.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms (inverted to COLMAP's world-to-camera).
        world_points (`(N, H, W, 3)` float): Per-pixel 3D points in the world frame.
        intrinsics (`(N, 3, 3)` float): Pinhole intrinsics of each view in pixels of the `W x H` views
            (`G2VLMReconstructionOutput.intrinsics[scene]`).
        images (`(N, H, W, 3)` uint8): RGB views at the geometry resolution.
        confidence (`(N, H, W)` float, *optional*): Per-pixel confidence.
        options: The options of [`write_colmap`]: `image_names`, `write_images`, `confidence_percentile`,
            `max_points`, `seed`.

    Returns:
        `list[Path]`: The written files.

    Raises:
        ValueError: On mismatched shapes, when no view has a usable camera, or when every point is filtered away.
    """
    scene = check_scene(camera_poses, world_points, images, confidence=confidence, intrinsics=intrinsics)
    return write_colmap(output_dir, scene, **options)


def write_colmap(
    output_dir: str | os.PathLike[str],
    scene: SceneArrays,
    *,
    image_names: Sequence[str] | None = None,
    write_images: bool = True,
    confidence_percentile: float | None = None,
    max_points: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """Writes a checked scene (from [`check_scene`] or [`check_reconstruction`], with its intrinsics) as a COLMAP text
    model (see the module docstring for the files).

    Args:
        output_dir (`str` or `os.PathLike`): Destination folder, created if missing; files of the same names are
            replaced.
        scene ([`SceneArrays`]): The checked arrays.
        image_names (`list[str]`, *optional*): File names of the views inside `images/` (default `view_000.png`, ...).
        write_images (`bool`, defaults to True): Also write the views into `images/`.
        confidence_percentile (`float`, *optional*): Drop points below this confidence percentile.
        max_points (`int`, *optional*): Random subsample of at most this many points.
        seed (`int`, defaults to 0): Seed of the subsample.

    Returns:
        `list[Path]`: The written files.

    Raises:
        NoUsableCameraError: When no view has a usable camera (nothing is written then).
        ValueError: When the scene has no intrinsics or every point is filtered away.
    """
    if scene.intrinsics is None:
        raise ValueError("No `intrinsics`: a COLMAP model needs each view's pinhole camera")
    poses, matrices, colours = scene.camera_poses, scene.intrinsics, scene.images
    points = scene.world_points.astype(np.float64)
    views, height, width = points.shape[:3]
    usable_camera = checked_usable_cameras(matrices)
    names = validate_image_names(image_names, 0, views, written_as_png=write_images)

    keep = confidence_mask(points, scene.confidence, confidence_percentile)
    keep &= usable_camera[:, None, None]
    flat = np.flatnonzero(keep)
    if flat.size == 0:
        raise ValueError("All points were filtered away (non-finite points or confidence below the percentile)")
    chosen = subsample(flat.size, max_points, seed)
    if chosen is not None:
        flat = flat[chosen]
    view_of, row_of, column_of = np.unravel_index(flat, (views, height, width))
    xyz = points[view_of, row_of, column_of]
    rgb = colours[view_of, row_of, column_of]

    error = reprojection_errors(poses, matrices, xyz, view_of, row_of, column_of)

    cameras = cameras_text(matrices, usable_camera, width, height)

    point_ids = np.arange(1, flat.size + 1)
    lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {int(usable_camera.sum())}",
    ]
    observation_index = np.zeros(flat.size, dtype=np.int64)
    for index in np.flatnonzero(usable_camera):
        world_to_camera_rotation = poses[index, :3, :3].T
        world_to_camera_translation = -world_to_camera_rotation @ poses[index, :3, 3]
        qw, qx, qy, qz = rotation_to_quaternion(world_to_camera_rotation)
        tx, ty, tz = world_to_camera_translation
        lines.append(
            f"{index + 1} {number_text(qw)} {number_text(qx)} {number_text(qy)} {number_text(qz)} {number_text(tx)} {number_text(ty)} {number_text(tz)} {index + 1} {names[index]}"
        )
        mine = np.flatnonzero(view_of == index)
        observation_index[mine] = np.arange(mine.size)
        lines.append(
            " ".join(f"{number_text(column_of[k] + 0.5)} {number_text(row_of[k] + 0.5)} {point_ids[k]}" for k in mine)
        )

    points_lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {flat.size}",
    ]
    for k in range(flat.size):
        x, y, z = xyz[k]
        r, g, b = (int(c) for c in rgb[k])
        points_lines.append(
            f"{point_ids[k]} {number_text(x)} {number_text(y)} {number_text(z)} {r} {g} {b} {number_text(error[k])} {view_of[k] + 1} {observation_index[k]}"
        )

    output_dir = Path(output_dir)
    payloads: list[tuple[Path, bytes]] = [
        (output_dir / "cameras.txt", cameras.encode()),
        (output_dir / "images.txt", ("\n".join(lines) + "\n").encode()),
        (output_dir / "points3D.txt", ("\n".join(points_lines) + "\n").encode()),
    ]
    if write_images:
        payloads += [
            (output_dir / "images" / name, png_bytes(colours[index]))
            for index, name in enumerate(names)
            if usable_camera[index]
        ]
    written = write_all_or_nothing(payloads, (output_dir, output_dir / "images"))
    logger.info(f"Wrote a COLMAP model of {int(usable_camera.sum())} images and {flat.size} points to {output_dir}")
    return written
