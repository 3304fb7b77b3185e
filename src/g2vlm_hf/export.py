"""Saving one scene's 3D reconstruction to disk: coloured point cloud (PLY), scene with camera frustums (GLB), camera
poses (JSON) and per-view 16-bit depth maps (PNG).

All inputs are for ONE scene, shaped like [`G2VLMReconstructionOutput`] without its batch dimension (index the scene
first, e.g. `output.world_points[0]`). Coordinates are written unchanged, in the model's world frame (the first
camera's OpenCV frame: x right, y down, z forward), so Y-up viewers may show the scene upside down.

Every file is written atomically: the bytes go to a temporary file in the destination folder which is then moved into
place with `os.replace`, so a failure never leaves a partial file behind.

`trimesh` is an optional dependency: `pip install "g2vlm-hf[export]"`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from transformers.utils import logging

from .safe_output import file_mode

if TYPE_CHECKING:
    import trimesh


logger = logging.get_logger(__name__)

ArrayLike = np.ndarray | torch.Tensor

#: Frustum depth as a fraction of the median camera-to-points distance.
DEFAULT_FRUSTUM_SCALE = 0.15

#: Largest uint16 code of a valid depth pixel; code 0 marks invalid depth.
_DEPTH_CODE_MAX = 65535

__all__ = [
    "colourise_depth",
    "compute_keep_mask",
    "export_reconstruction",
    "filter_points",
    "load_depth_png16",
    "robust_scene_scale",
    "save_cameras_json",
    "save_depth_png16",
    "save_depth_preview",
    "save_point_cloud_ply",
    "save_scene_glb",
    "view_colours",
]


# ----------------------------------------------------------------------------------------------------------- helpers


def _require_trimesh() -> Any:
    try:
        import trimesh
    except ImportError as error:
        raise ImportError(
            'Exporting point clouds and GLB scenes needs trimesh: pip install "g2vlm-hf[export]"'
        ) from error
    return trimesh


def _to_numpy(value: ArrayLike, name: str) -> np.ndarray:
    """Converts a torch tensor (any device or dtype) or array-like to a numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    try:
        return np.asarray(value)
    except Exception as error:
        raise ValueError(f"`{name}` must be a torch tensor or numpy array, got {type(value).__name__}") from error


def _check_shape(array: np.ndarray, name: str, expected: str, ndim: int, last: int | None = None) -> None:
    if array.ndim != ndim or (last is not None and array.shape[-1] != last):
        hint = f" (pass one scene, e.g. `output.{name}[0]`)" if array.ndim == ndim + 1 else ""
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(array.shape)}{hint}")


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Writes `data` to a temporary file beside `path`, then moves it into place with `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, file_mode())  # mkstemp makes it 0600; an output file gets the usual mode (0644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def write_all_or_nothing(payloads: Sequence[tuple[Path, bytes]], folders: Sequence[Path]) -> list[Path]:
    """Write every `(path, bytes)` atomically; if one write fails, remove the files already written and the
    `folders` this call created, then re-raise."""
    created = [folder for folder in folders if not folder.exists()]
    written: list[Path] = []
    try:
        for path, data in payloads:
            written.append(_atomic_write_bytes(path, data))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return written


def _validate_poses(camera_poses: ArrayLike) -> np.ndarray:
    poses = _to_numpy(camera_poses, "camera_poses").astype(np.float64)
    _check_shape(poses, "camera_poses", "(N, 4, 4)", 3)
    if poses.shape[1:] != (4, 4):
        raise ValueError(f"`camera_poses` must have shape (N, 4, 4), got {tuple(poses.shape)}")
    if poses.shape[0] == 0:
        raise ValueError("`camera_poses` holds zero views; at least one view is needed")
    if not np.isfinite(poses).all():
        raise ValueError("`camera_poses` contains NaN or Inf")
    if not np.allclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0], atol=1e-5):
        raise ValueError("`camera_poses` must be camera-to-world transforms with last row [0, 0, 0, 1]")
    return poses


# ---------------------------------------------------------------------------------------------------- point filtering


def compute_keep_mask(
    world_points: ArrayLike,
    confidence: ArrayLike | None = None,
    *,
    confidence_percentile: float | None = None,
) -> np.ndarray:
    """Per-pixel mask of the points worth keeping.

    Args:
        world_points (`(N, H, W, 3)` float): Per-pixel 3D points in the world frame.
        confidence (`(N, H, W)` float, *optional*): Unnormalised confidence, higher is more reliable.
        confidence_percentile (`float`, *optional*): In `[0, 100]`. Drops the points whose confidence is below this
            percentile of the finite points' confidence (20.0 keeps the top 80%). Ignored when `confidence` is None.

    Returns:
        `(N, H, W)` bool: True where the point is finite (and, when filtering by confidence, its confidence is finite
        and at least the percentile).

    Raises:
        ValueError: On wrong shapes or a percentile outside `[0, 100]`.
    """
    points = _to_numpy(world_points, "world_points")
    _check_shape(points, "world_points", "(N, H, W, 3)", 4, last=3)
    keep = np.isfinite(points).all(axis=-1)
    if confidence_percentile is None:
        return keep
    if not 0.0 <= confidence_percentile <= 100.0:
        raise ValueError(f"`confidence_percentile` must be in [0, 100], got {confidence_percentile}")
    if confidence is None:
        logger.warning("`confidence_percentile` is ignored: this reconstruction has no confidence")
        return keep
    scores = _to_numpy(confidence, "confidence").astype(np.float64)
    if scores.shape != points.shape[:-1]:
        raise ValueError(
            f"`confidence` must have shape {tuple(points.shape[:-1])} to match `world_points` {tuple(points.shape)}, "
            f"got {tuple(scores.shape)}"
        )
    keep &= np.isfinite(scores)
    if keep.any() and confidence_percentile > 0.0:
        threshold = np.percentile(scores[keep], confidence_percentile)
        keep &= scores >= threshold
    return keep


def filter_points(
    world_points: ArrayLike,
    images: ArrayLike,
    confidence: ArrayLike | None = None,
    *,
    confidence_percentile: float | None = None,
    max_points: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Flattens the per-pixel points of all views into a coloured point cloud, dropping unusable points.

    Args:
        world_points (`(N, H, W, 3)` float): Per-pixel 3D points in the world frame.
        images (`(N, H, W, 3)` uint8): RGB colour of each pixel.
        confidence (`(N, H, W)` float, *optional*): Unnormalised confidence, higher is more reliable.
        confidence_percentile (`float`, *optional*): See [`compute_keep_mask`].
        max_points (`int`, *optional*): Keep at most this many points, drawn uniformly at random without replacement
            (in their original order).
        seed (`int`, defaults to 0): Seed of the random subsample.

    Returns:
        `(points, colours)`: `(M, 3)` float32 points and `(M, 3)` uint8 RGB colours, `M >= 1`.

    Raises:
        ValueError: On mismatched shapes, non-uint8 images, `max_points < 1`, or when every point is filtered away.
    """
    points = _to_numpy(world_points, "world_points")
    _check_shape(points, "world_points", "(N, H, W, 3)", 4, last=3)
    colours = _to_numpy(images, "images")
    _check_shape(colours, "images", "(N, H, W, 3)", 4, last=3)
    if colours.shape != points.shape:
        raise ValueError(
            f"`images` {tuple(colours.shape)} must match `world_points` {tuple(points.shape)} (same views and size)"
        )
    if colours.dtype != np.uint8:
        raise ValueError(f"`images` must be uint8 RGB, got dtype {colours.dtype}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"`max_points` must be at least 1, got {max_points}")
    if points.shape[0] == 0:
        raise ValueError("`world_points` holds zero views; at least one view is needed")

    keep = compute_keep_mask(points, confidence, confidence_percentile=confidence_percentile)
    kept_points = points[keep].astype(np.float32)
    kept_colours = colours[keep]
    if kept_points.shape[0] == 0:
        raise ValueError(
            f"All {keep.size} points were filtered away (non-finite points or confidence below the "
            f"{confidence_percentile} percentile)"
        )
    if max_points is not None and kept_points.shape[0] > max_points:
        chosen = np.sort(np.random.default_rng(seed).choice(kept_points.shape[0], size=max_points, replace=False))
        kept_points, kept_colours = kept_points[chosen], kept_colours[chosen]
    logger.info(f"Keeping {kept_points.shape[0]} of {keep.size} points")
    return np.ascontiguousarray(kept_points), np.ascontiguousarray(kept_colours)


def _validate_cloud(points: ArrayLike, colours: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    points = _to_numpy(points, "points").astype(np.float32)
    colours = _to_numpy(colours, "colours")
    _check_shape(points, "points", "(M, 3)", 2, last=3)
    _check_shape(colours, "colours", "(M, 3)", 2, last=3)
    if points.shape[0] == 0:
        raise ValueError("`points` is empty")
    if colours.shape[0] != points.shape[0]:
        raise ValueError(f"`colours` has {colours.shape[0]} rows but `points` has {points.shape[0]}")
    if colours.dtype != np.uint8:
        raise ValueError(f"`colours` must be uint8 RGB, got dtype {colours.dtype}")
    if not np.isfinite(points).all():
        raise ValueError("`points` contains NaN or Inf; filter them first with `filter_points`")
    return points, colours


# ------------------------------------------------------------------------------------------------- point cloud, scene


def _encode_point_cloud_ply(points: ArrayLike, colours: ArrayLike) -> bytes:
    trimesh = _require_trimesh()
    points, colours = _validate_cloud(points, colours)
    return trimesh.PointCloud(points, colors=colours).export(file_type="ply", encoding="binary")


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
    return _atomic_write_bytes(Path(path), _encode_point_cloud_ply(points, colours))


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
    cloud = _to_numpy(points, "points").astype(np.float64).reshape(-1, 3)
    centres = _validate_poses(camera_poses)[:, :3, 3]
    cloud = cloud[np.isfinite(cloud).all(axis=1)]
    if cloud.shape[0] == 0:
        raise ValueError("`points` holds no finite point")
    if cloud.shape[0] > sample:
        cloud = cloud[np.linspace(0, cloud.shape[0] - 1, sample).astype(np.int64)]
    distances = np.linalg.norm(cloud[None] - centres[:, None], axis=-1)
    scale = float(np.median(np.median(distances, axis=1)))
    return scale if scale > 0.0 else 1.0


def _build_scene(
    points: ArrayLike,
    colours: ArrayLike,
    camera_poses: ArrayLike,
    *,
    image_size: tuple[int, int] | None,
    frustum_scale: float,
    frustum_colour: tuple[int, int, int] | None,
    show_cameras: bool = True,
) -> trimesh.Scene:
    trimesh = _require_trimesh()
    points, colours = _validate_cloud(points, colours)
    poses = _validate_poses(camera_poses)
    if frustum_scale <= 0.0:
        raise ValueError(f"`frustum_scale` must be positive, got {frustum_scale}")
    height, width = _validate_image_size(image_size) if image_size is not None else (1, 1)

    size = frustum_scale * robust_scene_scale(points, poses)
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
    scene = _build_scene(
        points,
        colours,
        camera_poses,
        image_size=image_size,
        frustum_scale=frustum_scale,
        frustum_colour=frustum_colour,
        show_cameras=show_cameras,
    )
    return _atomic_write_bytes(Path(path), scene.export(file_type="glb"))


# ----------------------------------------------------------------------------------------------------- cameras, depth


def _validate_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or any(int(side) != side or side < 1 for side in image_size):
        raise ValueError(f"`image_size` must be (height, width) positive integers, got {image_size}")
    return int(image_size[0]), int(image_size[1])


def _validate_intrinsics(intrinsics: ArrayLike | None, num_views: int) -> np.ndarray | None:
    if intrinsics is None:
        return None
    matrices = _to_numpy(intrinsics, "intrinsics").astype(np.float64)
    if matrices.shape != (num_views, 3, 3):
        hint = " (pass one scene, e.g. `output.intrinsics[0]`)" if matrices.ndim == 4 else ""
        raise ValueError(f"`intrinsics` must have shape ({num_views}, 3, 3), got {tuple(matrices.shape)}{hint}")
    return matrices


def _validate_original_sizes(original_sizes: Sequence[Sequence[int]] | None, num_views: int) -> list | None:
    if original_sizes is None:
        return None
    sizes = [_validate_image_size(size) for size in original_sizes]
    if len(sizes) != num_views:
        raise ValueError(f"`original_sizes` has {len(sizes)} entries for {num_views} views")
    return sizes


def _json_matrix(matrix: np.ndarray) -> list:
    """Nested lists, NaN written as None (JSON has no NaN)."""
    return [[None if not math.isfinite(value) else value for value in row] for row in matrix.tolist()]


def _encode_cameras_json(
    camera_poses: ArrayLike,
    image_size: Sequence[int],
    intrinsics: ArrayLike | None = None,
    original_sizes: Sequence[Sequence[int]] | None = None,
) -> bytes:
    poses = _validate_poses(camera_poses)
    height, width = _validate_image_size(image_size)
    matrices = _validate_intrinsics(intrinsics, len(poses))
    sizes = _validate_original_sizes(original_sizes, len(poses))
    cameras = []
    for index, pose in enumerate(poses):
        camera: dict[str, Any] = {"index": index, "camera_to_world": pose.tolist(), "width": width, "height": height}
        if matrices is not None:
            camera["intrinsics"] = _json_matrix(matrices[index])
        if sizes is not None:
            original = {"height": sizes[index][0], "width": sizes[index][1]}
            if matrices is not None:
                scale = np.array([[sizes[index][1] / width], [sizes[index][0] / height], [1.0]])
                original["intrinsics"] = _json_matrix(matrices[index] * scale)
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
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def save_cameras_json(
    path: str | os.PathLike[str],
    camera_poses: ArrayLike,
    image_size: tuple[int, int],
    intrinsics: ArrayLike | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Saves the camera poses (and intrinsics) as JSON.

    The document is `{"convention": str, "intrinsics_convention": str, "cameras": [{"index": int, "camera_to_world":
    4x4 nested list, "width": int, "height": int, "intrinsics": 3x3 (with `intrinsics`), "original": {"width",
    "height", "intrinsics"} (with `original_sizes`)}, ...]}`, one entry per view in view order. Intrinsics a view
    could not be fitted for hold `null`.

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        image_size (`tuple[int, int]`): `(height, width)` of the views in pixels.
        intrinsics (`(N, 3, 3)` float, *optional*): Pinhole intrinsics in pixels of `image_size`
            (`G2VLMReconstructionOutput.intrinsics[scene]`).
        original_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` of each original image; the
            intrinsics are also written rescaled to them.

    Returns:
        `Path`: The written file.

    Raises:
        ValueError: On bad shapes, non-finite poses or a bad image size.
    """
    return _atomic_write_bytes(Path(path), _encode_cameras_json(camera_poses, image_size, intrinsics, original_sizes))


def _encode_depth_png16(depth: ArrayLike) -> tuple[bytes, tuple[float, float] | None]:
    values = _to_numpy(depth, "depth").astype(np.float64)
    _check_shape(values, "depth", "(H, W)", 2)
    valid = np.isfinite(values) & (values > 0.0)
    codes = np.zeros(values.shape, dtype=np.uint16)
    depth_range = None
    if valid.any():
        low, high = float(values[valid].min()), float(values[valid].max())
        span = high - low
        scaled = (values[valid] - low) / span if span > 0.0 else np.zeros(int(valid.sum()))
        codes[valid] = (1 + np.rint(scaled * (_DEPTH_CODE_MAX - 1))).astype(np.uint16)
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
    data, depth_range = _encode_depth_png16(depth)
    _atomic_write_bytes(Path(path), data)
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
    depth = low + (codes - 1.0) / (_DEPTH_CODE_MAX - 1) * (high - low)
    depth[codes == 0] = math.nan
    return depth


#: Colour ramp of the depth previews, far (dark blue-violet) to near (light yellow): perceptually ordered and readable
#: by the common colour-vision deficiencies. Linear interpolation between these anchors.
_DEPTH_RAMP = np.array(
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
    values = _to_numpy(depth, "depth").astype(np.float64)
    _check_shape(values, "depth", "(H, W)", 2)
    if not 0.0 <= low_percentile < high_percentile <= 100.0:
        raise ValueError(f"need 0 <= low_percentile < high_percentile <= 100, got {low_percentile}, {high_percentile}")
    valid = np.isfinite(values) & (values > 0.0)
    image = np.zeros((*values.shape, 3), dtype=np.uint8)
    if not valid.any():
        return image
    disparity = 1.0 / values[valid]
    low, high = np.percentile(disparity, [low_percentile, high_percentile])
    position = np.clip((disparity - low) / (high - low), 0.0, 1.0) if high > low else np.full_like(disparity, 0.5)
    scaled = position * (len(_DEPTH_RAMP) - 1)
    lower = np.minimum(np.floor(scaled).astype(np.int64), len(_DEPTH_RAMP) - 2)
    weight = (scaled - lower)[:, None]
    image[valid] = np.rint((1.0 - weight) * _DEPTH_RAMP[lower] + weight * _DEPTH_RAMP[lower + 1]).astype(np.uint8)
    return image


def _encode_depth_preview(depth: ArrayLike) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(colourise_depth(depth)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_depth_preview(path: str | os.PathLike[str], depth: ArrayLike) -> Path:
    """Saves one view's depth as a colour-mapped 8-bit RGB PNG (see [`colourise_depth`]); a picture, not data: use
    [`save_depth_png16`] for the values."""
    return _atomic_write_bytes(Path(path), _encode_depth_preview(depth))


# ----------------------------------------------------------------------------------------------------------- all of it


def export_reconstruction(
    output_dir: str | os.PathLike[str],
    *,
    camera_poses: ArrayLike,
    world_points: ArrayLike,
    depth: ArrayLike,
    images: ArrayLike,
    confidence: ArrayLike | None = None,
    confidence_percentile: float | None = None,
    max_points: int | None = None,
    seed: int = 0,
    frustum_scale: float = DEFAULT_FRUSTUM_SCALE,
    intrinsics: ArrayLike | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
    point_colouring: str = "image",
) -> list[Path]:
    """Writes one scene's reconstruction into `output_dir`.

    Files: `scene.glb` (see [`save_scene_glb`]), `points.ply` (see [`save_point_cloud_ply`]), `cameras.json` (see
    [`save_cameras_json`]), `depth/view_000.png`, ... (see [`save_depth_png16`]) and after them the colour-mapped
    previews `depth/view_000_preview.png`, ... (see [`save_depth_preview`]). Existing files of these names
    are replaced. Every file is encoded in memory before any is written; if writing fails, the files this call
    already wrote are removed again (earlier files they replaced are not restored), so a failed export leaves neither
    partial nor temporary files.

    Args:
        output_dir (`str` or `os.PathLike`): Destination folder, created if missing.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        world_points (`(N, H, W, 3)` float): Per-pixel 3D points in the world frame.
        depth (`(N, H, W)` float): Positive depth along each camera's z axis.
        images (`(N, H, W, 3)` uint8): RGB views at the geometry resolution, colouring the points.
        confidence (`(N, H, W)` float, *optional*): Unnormalised confidence, higher is more reliable.
        confidence_percentile (`float`, *optional*): Drop points below this confidence percentile (20.0 keeps the top
            80%); ignored when `confidence` is None.
        max_points (`int`, *optional*): Random subsample of at most this many points for the PLY and GLB.
        seed (`int`, defaults to 0): Seed of the random subsample.
        frustum_scale (`float`, defaults to 0.15): Frustum depth as a fraction of the median camera-to-points
            distance (see [`save_scene_glb`]).
        intrinsics (`(N, 3, 3)` float, *optional*): Pinhole intrinsics in pixels of the views, written to
            `cameras.json`.
        original_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` of each original image, for the
            rescaled intrinsics in `cameras.json`.
        point_colouring (`str`, defaults to `"image"`): `"image"` colours each point by its pixel, `"view"` by its
            view's colour (the colour of that view's frustum, [`view_colours`]).

    Returns:
        `list[Path]`: The written files, in the order above.

    Raises:
        ValueError: On mismatched shapes between poses, points, depth, confidence and images, zero views, or when all
            points are filtered away.
        ImportError: When trimesh is not installed.
    """
    poses = _validate_poses(camera_poses)
    points = _to_numpy(world_points, "world_points")
    _check_shape(points, "world_points", "(N, H, W, 3)", 4, last=3)
    depths = _to_numpy(depth, "depth")
    _check_shape(depths, "depth", "(N, H, W)", 3)
    if points.shape[0] != poses.shape[0]:
        raise ValueError(f"`world_points` has {points.shape[0]} views but `camera_poses` has {poses.shape[0]}")
    if depths.shape != points.shape[:-1]:
        raise ValueError(f"`depth` {tuple(depths.shape)} must match `world_points` {tuple(points.shape)}")
    if confidence is not None:
        confidence = _to_numpy(confidence, "confidence")
        if confidence.shape != depths.shape:
            raise ValueError(f"`confidence` {tuple(confidence.shape)} must match `world_points` {tuple(points.shape)}")
    image_size = (int(points.shape[1]), int(points.shape[2]))
    if point_colouring not in ("image", "view"):
        raise ValueError(f'`point_colouring` must be "image" or "view", got {point_colouring!r}')
    if point_colouring == "view":
        _check_shape(_to_numpy(images, "images"), "images", "(N, H, W, 3)", 4, last=3)
        images = np.broadcast_to(view_colours(points.shape[0])[:, None, None], points.shape).copy()

    cloud, colours = filter_points(
        points,
        images,
        confidence,
        confidence_percentile=confidence_percentile,
        max_points=max_points,
        seed=seed,
    )
    scene = _build_scene(cloud, colours, poses, image_size=image_size, frustum_scale=frustum_scale, frustum_colour=None)
    output_dir = Path(output_dir)
    payloads: list[tuple[Path, bytes]] = [
        (output_dir / "scene.glb", scene.export(file_type="glb")),
        (output_dir / "points.ply", _encode_point_cloud_ply(cloud, colours)),
        (output_dir / "cameras.json", _encode_cameras_json(poses, image_size, intrinsics, original_sizes)),
    ]
    for index, view_depth in enumerate(depths):
        payloads.append((output_dir / "depth" / f"view_{index:03d}.png", _encode_depth_png16(view_depth)[0]))
    for index, view_depth in enumerate(depths):
        payloads.append((output_dir / "depth" / f"view_{index:03d}_preview.png", _encode_depth_preview(view_depth)))

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
    **options: Any,
) -> list[Path]:
    """Writes scene `scene` of a model's reconstruction (`G2VLMReconstructionOutput`), coloured by its geometry views
    (`geometry_pixel_values` as the processor made them, unnormalised by `geometry_image_processor`). `options` go
    to [`export_reconstruction`] (`confidence_percentile`, `max_points`, `original_sizes`, ...)."""
    confidence = reconstruction.confidence
    intrinsics = getattr(reconstruction, "intrinsics", None)
    return export_reconstruction(
        output_dir,
        intrinsics=None if intrinsics is None else intrinsics[scene],
        camera_poses=reconstruction.camera_poses[scene],
        world_points=reconstruction.world_points[scene],
        depth=reconstruction.depth[scene],
        confidence=None if confidence is None else confidence[scene],
        images=geometry_image_processor.unnormalize(geometry_pixel_values[scene].cpu()),
        **options,
    )
