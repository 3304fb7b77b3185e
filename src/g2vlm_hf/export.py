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

#: Largest uint16 code of a valid depth pixel; code 0 marks invalid depth.
_DEPTH_CODE_MAX = 65535

__all__ = [
    "compute_keep_mask",
    "export_reconstruction",
    "filter_points",
    "load_depth_png16",
    "save_cameras_json",
    "save_depth_png16",
    "save_point_cloud_ply",
    "save_scene_glb",
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
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return path


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


def _build_scene(
    points: ArrayLike,
    colours: ArrayLike,
    camera_poses: ArrayLike,
    *,
    image_size: tuple[int, int] | None,
    frustum_scale: float,
    frustum_colour: tuple[int, int, int],
) -> trimesh.Scene:
    trimesh = _require_trimesh()
    points, colours = _validate_cloud(points, colours)
    poses = _validate_poses(camera_poses)
    if frustum_scale <= 0.0:
        raise ValueError(f"`frustum_scale` must be positive, got {frustum_scale}")
    height, width = _validate_image_size(image_size) if image_size is not None else (1, 1)

    everything = np.concatenate([points.astype(np.float64), poses[:, :3, 3]])
    extent = float(np.linalg.norm(everything.max(axis=0) - everything.min(axis=0)))
    size = frustum_scale * (extent if extent > 0.0 else 1.0)

    scene = trimesh.Scene()
    scene.add_geometry(trimesh.PointCloud(points, colors=colours), node_name="points", geom_name="points")
    segments = _frustum_segments(size, width / height)
    rgba = np.array([*frustum_colour, 255], dtype=np.uint8)
    for index, pose in enumerate(poses):
        frustum = trimesh.load_path(segments)
        frustum.colors = np.tile(rgba, (len(frustum.entities), 1))
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
    frustum_scale: float = 0.05,
    frustum_colour: tuple[int, int, int] = (255, 64, 0),
) -> Path:
    """Saves a GLB scene: the coloured point cloud (node `points`) and one wireframe camera frustum per view.

    Each frustum is a pyramid of 8 line segments (glTF `LINES`) in its camera's frame (apex at the camera centre,
    base facing +z), in a node named `camera_{i}` whose transform is the view's camera-to-world pose.

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        points (`(M, 3)` float): Finite 3D points in the world frame.
        colours (`(M, 3)` uint8): RGB colour of each point.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        image_size (`tuple[int, int]`, *optional*): `(height, width)` of the views; sets the frustums' aspect ratio
            (square when None).
        frustum_scale (`float`, defaults to 0.05): Frustum depth as a fraction of the scene's extent (the diagonal of
            the bounding box of the points and camera centres).
        frustum_colour (`tuple[int, int, int]`, defaults to orange): RGB colour of the frustum lines.

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
    )
    return _atomic_write_bytes(Path(path), scene.export(file_type="glb"))


# ----------------------------------------------------------------------------------------------------- cameras, depth


def _validate_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or any(int(side) != side or side < 1 for side in image_size):
        raise ValueError(f"`image_size` must be (height, width) positive integers, got {image_size}")
    return int(image_size[0]), int(image_size[1])


def _encode_cameras_json(camera_poses: ArrayLike, image_size: Sequence[int]) -> bytes:
    poses = _validate_poses(camera_poses)
    height, width = _validate_image_size(image_size)
    document = {
        "convention": "camera_to_world; camera frame is OpenCV (x right, y down, z forward)",
        "cameras": [
            {"index": index, "camera_to_world": pose.tolist(), "width": width, "height": height}
            for index, pose in enumerate(poses)
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def save_cameras_json(path: str | os.PathLike[str], camera_poses: ArrayLike, image_size: tuple[int, int]) -> Path:
    """Saves the camera poses as JSON.

    The document is `{"convention": str, "cameras": [{"index": int, "camera_to_world": 4x4 nested list, "width": int,
    "height": int}, ...]}`, one entry per view in view order.

    Args:
        path (`str` or `os.PathLike`): Destination file; its folder is created if missing.
        camera_poses (`(N, 4, 4)` float): Camera-to-world transforms.
        image_size (`tuple[int, int]`): `(height, width)` of the views in pixels.

    Returns:
        `Path`: The written file.

    Raises:
        ValueError: On bad shapes, non-finite poses or a bad image size.
    """
    return _atomic_write_bytes(Path(path), _encode_cameras_json(camera_poses, image_size))


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
    frustum_scale: float = 0.05,
) -> list[Path]:
    """Writes one scene's reconstruction into `output_dir`.

    Files: `scene.glb` (see [`save_scene_glb`]), `points.ply` (see [`save_point_cloud_ply`]), `cameras.json` (see
    [`save_cameras_json`]) and `depth/view_000.png`, ... (see [`save_depth_png16`]). Existing files of these names
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
        frustum_scale (`float`, defaults to 0.05): Frustum depth as a fraction of the scene's extent.

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

    cloud, colours = filter_points(
        points,
        images,
        confidence,
        confidence_percentile=confidence_percentile,
        max_points=max_points,
        seed=seed,
    )
    scene = _build_scene(
        cloud, colours, poses, image_size=image_size, frustum_scale=frustum_scale, frustum_colour=(255, 64, 0)
    )
    output_dir = Path(output_dir)
    payloads: list[tuple[Path, bytes]] = [
        (output_dir / "scene.glb", scene.export(file_type="glb")),
        (output_dir / "points.ply", _encode_point_cloud_ply(cloud, colours)),
        (output_dir / "cameras.json", _encode_cameras_json(poses, image_size)),
    ]
    for index, view_depth in enumerate(depths):
        payloads.append((output_dir / "depth" / f"view_{index:03d}.png", _encode_depth_png16(view_depth)[0]))

    created_dirs = [folder for folder in (output_dir, output_dir / "depth") if not folder.exists()]
    written: list[Path] = []
    try:
        for path, data in payloads:
            written.append(_atomic_write_bytes(path, data))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(created_dirs):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
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
    to [`export_reconstruction`] (`confidence_percentile`, `max_points`, ...)."""
    confidence = reconstruction.confidence
    return export_reconstruction(
        output_dir,
        camera_poses=reconstruction.camera_poses[scene],
        world_points=reconstruction.world_points[scene],
        depth=reconstruction.depth[scene],
        confidence=None if confidence is None else confidence[scene],
        images=geometry_image_processor.unnormalize(geometry_pixel_values[scene].cpu()),
        **options,
    )
