"""One scene's whole export into a folder: `scene.glb`, `points.ply`, `cameras.json` and the depth maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from transformers.processing_utils import Unpack
from transformers.utils import logging

from .atomic import write_all_or_nothing
from .cameras import encode_cameras_json
from .depth_png import encode_depth_png16, encode_depth_preview
from .glb import DEFAULT_FRUSTUM_SCALE, build_scene, view_colours
from .ply import encode_point_cloud_ply
from .points import confidence_mask, kept_cloud
from .validation import (
    ArrayLike,
    SceneArrays,
    check_reconstruction,
    check_scene,
    validate_original_sizes,
    validate_view_names,
)

logger = logging.get_logger(__name__)

__all__ = ["SceneExportOptions", "export_model_scene", "export_reconstruction", "write_scene"]


class SceneExportOptions(TypedDict, total=False):
    """The options of [`write_scene`], for the functions that forward them (typed so that editors complete them)."""

    point_colouring: str
    confidence_percentile: float | None
    max_points: int | None
    seed: int
    frustum_scale: float
    original_sizes: Sequence[tuple[int, int]] | None
    view_names: Sequence[str] | None


def export_reconstruction(
    output_dir: str | os.PathLike[str],
    *,
    camera_poses: ArrayLike,
    world_points: ArrayLike,
    depth: ArrayLike,
    images: ArrayLike,
    confidence: ArrayLike | None = None,
    intrinsics: ArrayLike | None = None,
    **options: Unpack[SceneExportOptions],
) -> list[Path]:
    """Writes one scene's reconstruction into `output_dir`: [`check_scene`] of the arrays, then [`write_scene`].

    Args:
        output_dir (`str` or `os.PathLike`): Destination folder, created if missing; files of the same names are
            replaced, other files are left as they are (`g2vlm reconstruct` writes an owned folder instead: README
            "Safety of outputs").
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        world_points (`(N, H, W, 3)` float): Per-pixel 3D points in the world frame.
        depth (`(N, H, W)` float): Positive depth along each camera's z axis.
        images (`(N, H, W, 3)` uint8): RGB views at the geometry resolution, colouring the points.
        confidence (`(N, H, W)` float, *optional*): Unnormalised confidence, higher is more reliable.
        intrinsics (`(N, 3, 3)` float, *optional*): Pinhole intrinsics in pixels of the views, written to
            `cameras.json`.
        options: The options of [`write_scene`]: `confidence_percentile`, `max_points`, `seed`, `frustum_scale`,
            `original_sizes`, `view_names`, `point_colouring`.

    Returns:
        `list[Path]`: The written files, in the order of [`write_scene`].

    Raises:
        ValueError: On mismatched shapes between poses, points, depth, confidence and images, zero views, or when all
            points are filtered away.
        ImportError: When trimesh is not installed.
    """
    scene = check_scene(camera_poses, world_points, images, depth=depth, confidence=confidence, intrinsics=intrinsics)
    return write_scene(output_dir, scene, **options)


def write_scene(
    output_dir: str | os.PathLike[str],
    scene: SceneArrays,
    *,
    point_colouring: str = "image",
    confidence_percentile: float | None = None,
    max_points: int | None = None,
    seed: int = 0,
    frustum_scale: float = DEFAULT_FRUSTUM_SCALE,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    view_names: Sequence[str] | None = None,
) -> list[Path]:
    """Writes a checked scene (from [`check_scene`] or [`check_reconstruction`], with its depth) into `output_dir`.

    Files: `scene.glb` (see [`save_scene_glb`]), `points.ply` (see [`save_point_cloud_ply`]), `cameras.json` (see
    [`save_cameras_json`]), `depth/view_000.png`, ... (see [`save_depth_png16`]) and after them the colour-mapped
    previews `depth/view_000_preview.png`, ... (see [`save_depth_preview`]). Existing files of these names
    are replaced. Every file is encoded in memory before any is written; if writing fails, the files this call
    already wrote are removed again (earlier files they replaced are not restored), so a failed export leaves neither
    partial nor temporary files.

    Args:
        output_dir (`str` or `os.PathLike`): Destination folder, created if missing; files of the same names are
            replaced, other files are left as they are (`g2vlm reconstruct` writes an owned folder instead: README
            "Safety of outputs").
        scene ([`SceneArrays`]): The checked arrays.
        point_colouring (`str`, defaults to `"image"`): `"image"` colours each point by its pixel, `"view"` by its
            view's colour (the colour of that view's frustum, [`view_colours`]).
        confidence_percentile (`float`, *optional*): Drop points below this confidence percentile (20.0 keeps the top
            80%); ignored when the scene has no confidence.
        max_points (`int`, *optional*): Random subsample of at most this many points for the PLY and GLB.
        seed (`int`, defaults to 0): Seed of the random subsample.
        frustum_scale (`float`, defaults to 0.15): Frustum depth as a fraction of the median camera-to-points
            distance (see [`save_scene_glb`]).
        original_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` of each original image, for the
            rescaled intrinsics in `cameras.json`.
        view_names (`list[str]`, *optional*): Each view's name (e.g. its file name), the cameras' `name` in
            `cameras.json`.

    Returns:
        `list[Path]`: The written files, in the order above.

    Raises:
        ValueError: On bad options, a scene without depth, or when all points are filtered away.
        ImportError: When trimesh is not installed.
    """
    if scene.depth is None:
        raise ValueError("The scene has no `depth`; the export writes one depth map per view")
    if point_colouring not in ("image", "view"):
        raise ValueError(f'`point_colouring` must be "image" or "view", got {point_colouring!r}')
    poses, points, image_size = scene.camera_poses, scene.world_points, scene.image_size
    sizes = validate_original_sizes(original_sizes, len(poses), image_size)
    names = validate_view_names(view_names, len(poses))
    colours = scene.images
    if point_colouring == "view":
        colours = np.broadcast_to(view_colours(len(poses))[:, None, None], points.shape)
    keep = confidence_mask(points, scene.confidence, confidence_percentile)
    cloud, cloud_colours = kept_cloud(points, colours, keep, max_points=max_points, seed=seed)
    glb = build_scene(
        cloud, cloud_colours, poses, image_size=image_size, frustum_scale=frustum_scale, frustum_colour=None
    )
    output_dir = Path(output_dir)
    payloads: list[tuple[Path, bytes]] = [
        (output_dir / "scene.glb", glb.export(file_type="glb")),
        (output_dir / "points.ply", encode_point_cloud_ply(cloud, cloud_colours)),
        (output_dir / "cameras.json", encode_cameras_json(poses, image_size, scene.intrinsics, sizes, names)),
    ]
    for index, view_depth in enumerate(scene.depth):
        payloads.append((output_dir / "depth" / f"view_{index:03d}.png", encode_depth_png16(view_depth)[0]))
    for index, view_depth in enumerate(scene.depth):
        payloads.append((output_dir / "depth" / f"view_{index:03d}_preview.png", encode_depth_preview(view_depth)))

    written = write_all_or_nothing(payloads, (output_dir, output_dir / "depth"))
    logger.info(f"Wrote {len(written)} files to {output_dir}")
    return written


def export_model_scene(
    output_dir: str | os.PathLike[str],
    reconstruction: Any,
    geometry_pixel_values: torch.Tensor,
    geometry_image_processor: Any,
    *,
    scene: int = 0,
    **options: Unpack[SceneExportOptions],
) -> list[Path]:
    """[`write_scene`] of scene `scene` of a model's reconstruction (`G2VLMReconstructionOutput`), coloured by its
    geometry views (`geometry_pixel_values` as the processor made them, unnormalised by `geometry_image_processor`).
    `options` go to [`write_scene`] (`confidence_percentile`, `max_points`, `original_sizes`, ...). For a COLMAP
    model too, check once and write both: `write_colmap(folder, check_reconstruction(...))`."""
    checked = check_reconstruction(reconstruction, geometry_pixel_values, geometry_image_processor, scene=scene)
    return write_scene(output_dir, checked, **options)
