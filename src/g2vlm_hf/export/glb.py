"""GLB scenes: the coloured point cloud and one camera frustum per view, drawn as thin triangle tubes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import write_bytes_atomic
from .ply import require_trimesh
from .validation import ArrayLike, to_numpy, validate_cloud, validate_colour, validate_image_size, validate_poses

if TYPE_CHECKING:
    import trimesh

__all__ = [
    "DEFAULT_FRUSTUM_SCALE",
    "build_scene",
    "median_camera_distance",
    "robust_scene_scale",
    "save_scene_glb",
    "view_colours",
]

#: Frustum depth as a fraction of the median camera-to-points distance.
DEFAULT_FRUSTUM_SCALE = 0.15


def _frustum_segments(size: float, aspect: float) -> np.ndarray:
    """`(8, 2, 3)` line segments of a pyramid in the camera frame (apex at the centre, base at `z = size`)."""
    half_h = 0.5 * size
    half_w = half_h * aspect
    corners = np.array(
        [[-half_w, -half_h, size], [half_w, -half_h, size], [half_w, half_h, size], [-half_w, half_h, size]]
    )
    apex = np.zeros(3)
    sides = [(apex, corner) for corner in corners]
    base = [(corners[i], corners[(i + 1) % 4]) for i in range(4)]
    return np.array(sides + base, dtype=np.float64)


def _segments_as_tubes(segments: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh of square tubes `width` wide around each segment (`(S, 2, 3)`): `(S * 8, 3)` vertices and
    `(S * 8, 3)` faces. Triangles render in every glTF viewer; line primitives do not (or one pixel wide)."""
    vertices, faces = [], []
    for start, end in segments:
        direction = end - start
        direction = direction / np.linalg.norm(direction)
        helper = np.array([1.0, 0.0, 0.0]) if abs(direction[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        side = np.cross(direction, helper)
        side /= np.linalg.norm(side)
        up = np.cross(direction, side)
        ring = [0.5 * width * (a * side + b * up) for a, b in ((1, 1), (-1, 1), (-1, -1), (1, -1))]
        offset = len(vertices)
        vertices += [start + r for r in ring] + [end + r for r in ring]
        for k in range(4):
            a, b = offset + k, offset + (k + 1) % 4
            faces += [(a, b, b + 4), (a, b + 4, a + 4)]
    return np.array(vertices, dtype=np.float64), np.array(faces, dtype=np.int64)


def view_colours(num_views: int) -> np.ndarray:
    """`(num_views, 3)` uint8 RGB: one distinct, saturated colour per view (hues spread by the golden angle), shared
    by a view's camera frustum and, with `point_colouring="view"`, its points."""
    hues = (np.arange(num_views) * 0.618033988749895) % 1.0
    sector = hues * 6.0
    # HSV -> RGB at saturation 0.85 and value 0.95, vectorised
    value, saturation = 0.95, 0.85
    fraction = sector - np.floor(sector)
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    table = np.stack(
        [
            np.stack([np.full_like(q, value), t, np.full_like(q, p)], -1),
            np.stack([q, np.full_like(q, value), np.full_like(q, p)], -1),
            np.stack([np.full_like(q, p), np.full_like(q, value), t], -1),
            np.stack([np.full_like(q, p), q, np.full_like(q, value)], -1),
            np.stack([t, np.full_like(q, p), np.full_like(q, value)], -1),
            np.stack([np.full_like(q, value), np.full_like(q, p), q], -1),
        ],
        axis=1,
    )
    rgb = table[np.arange(num_views), np.floor(sector).astype(int) % 6]
    return np.rint(rgb * 255).astype(np.uint8)


def robust_scene_scale(points: ArrayLike, camera_poses: ArrayLike, sample: int = 20_000) -> float:
    """Typical camera-to-scene distance: the median over cameras of the median distance from the camera centre to
    the points (a deterministic subsample of at most `sample` points). Outliers far away, which set the bounding
    box, barely move it. Returns 1.0 when every distance is zero."""
    cloud = to_numpy(points, "points").astype(np.float64).reshape(-1, 3)
    return median_camera_distance(cloud, validate_poses(camera_poses)[:, :3, 3], sample)


def median_camera_distance(cloud: np.ndarray, centres: np.ndarray, sample: int = 20_000, batch: int = 32) -> float:
    """[`robust_scene_scale`] of `(M, 3)` points (non-finite rows dropped) and `(N, 3)` camera centres, `batch`
    cameras at a time (a `(cameras, sample, 3)` array at once would be 0.5 GB at 1,000 views)."""
    cloud = cloud[np.isfinite(cloud).all(axis=1)]
    if cloud.shape[0] == 0:
        raise ValueError("`points` holds no finite point")
    if cloud.shape[0] > sample:
        cloud = cloud[np.linspace(0, cloud.shape[0] - 1, sample).astype(np.int64)]
    per_camera = [
        np.median(np.linalg.norm(cloud[None] - centres[start : start + batch, None], axis=-1), axis=1)
        for start in range(0, len(centres), batch)
    ]
    scale = float(np.median(np.concatenate(per_camera)))
    return scale if scale > 0.0 else 1.0


def build_scene(
    points: np.ndarray,
    colours: np.ndarray,
    poses: np.ndarray,
    *,
    image_size: tuple[int, int],
    frustum_scale: float,
    frustum_colour: tuple[int, int, int] | None,
    show_cameras: bool = True,
) -> trimesh.Scene:
    """The scene of [`save_scene_glb`] from checked arrays: a cloud (see [`validate_cloud`]), poses (see
    [`validate_poses`]) and the views' `(height, width)`."""
    trimesh = require_trimesh()
    if not 0.0 < frustum_scale < float("inf"):
        raise ValueError(f"`frustum_scale` must be a positive finite number, got {frustum_scale}")
    height, width = image_size
    size = frustum_scale * median_camera_distance(points.astype(np.float64), poses[:, :3, 3])
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.PointCloud(points, colors=colours), node_name="points", geom_name="points")
    vertices, faces = _segments_as_tubes(_frustum_segments(size, width / height), width=0.04 * size)
    palette = view_colours(len(poses)) if frustum_colour is None else np.tile(frustum_colour, (len(poses), 1))
    for index, pose in enumerate(poses if show_cameras else []):
        rgba = np.array([*palette[index], 255], dtype=np.uint8)
        frustum = trimesh.Trimesh(vertices, faces, vertex_colors=np.tile(rgba, (len(vertices), 1)), process=False)
        name = f"camera_{index}"
        scene.add_geometry(frustum, node_name=name, geom_name=name, transform=pose)
    return scene


def save_scene_glb(
    path: str | os.PathLike[str],
    points: ArrayLike,
    colours: ArrayLike,
    camera_poses: ArrayLike,
    *,
    image_size: tuple[int, int] | None = None,
    frustum_scale: float = DEFAULT_FRUSTUM_SCALE,
    frustum_colour: tuple[int, int, int] | None = None,
    show_cameras: bool = True,
) -> Path:
    """Saves a GLB scene: the coloured point cloud (node `points`) and one camera frustum per view.

    Each frustum is a pyramid of 8 edges in its camera's frame (apex at the camera centre, base facing +z, with the
    views' aspect ratio), each edge a thin square tube of triangles so that every glTF viewer shows it, in a node
    named `camera_{i}` whose transform is the view's camera-to-world pose. Its depth is `frustum_scale` times the
    robust scene scale of [`robust_scene_scale`] (the median camera-to-points distance), so far-away outlier points
    do not blow the frustums up.

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        points (`(M, 3)` float): Finite 3D points in the world frame.
        colours (`(M, 3)` uint8): RGB colour of each point.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        image_size (`tuple[int, int]`, *optional*): `(height, width)` of the views; sets the frustums' aspect ratio
            (square when None).
        frustum_scale (`float`, defaults to 0.15): Frustum depth as a fraction of the median camera-to-points
            distance.
        frustum_colour (`tuple[int, int, int]`, *optional*): One RGB colour for every frustum; by default each view
            has its own colour from [`view_colours`].
        show_cameras (`bool`, defaults to True): Include the frustums (False writes the points alone).

    Returns:
        `Path`: The written file.

    Raises:
        ValueError: On bad shapes, dtypes, non-finite values or poses whose last row is not `[0, 0, 0, 1]`.
        ImportError: When trimesh is not installed.
    """
    require_trimesh()
    points, colours = validate_cloud(points, colours)
    scene = build_scene(
        points,
        colours,
        validate_poses(camera_poses),
        image_size=(1, 1) if image_size is None else validate_image_size(image_size),
        frustum_scale=frustum_scale,
        frustum_colour=None if frustum_colour is None else validate_colour(frustum_colour, "frustum_colour"),
        show_cameras=show_cameras,
    )
    return write_bytes_atomic(path, scene.export(file_type="glb"))
