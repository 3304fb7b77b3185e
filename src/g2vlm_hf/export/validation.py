"""Checks of the arrays an export is given, done once where a public function takes them.

[`check_scene`] turns one scene's predictions (torch tensors or numpy arrays) into a [`SceneArrays`] of numpy arrays
that agree with each other; the writers behind the public functions take that and check nothing again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..integers import is_integer

logger = logging.get_logger(__name__)

ArrayLike = np.ndarray | torch.Tensor

__all__ = [
    "ArrayLike",
    "SceneArrays",
    "check_confidence",
    "check_images",
    "check_reconstruction",
    "check_scene",
    "check_shape",
    "to_numpy",
    "validate_cloud",
    "validate_image_size",
    "validate_intrinsics",
    "validate_original_sizes",
    "validate_poses",
    "validate_view_names",
]


def to_numpy(value: ArrayLike, name: str) -> np.ndarray:
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


def check_shape(array: np.ndarray, name: str, expected: str, ndim: int, last: int | None = None) -> None:
    """Raises a `ValueError` naming `name` when `array` is not `ndim`-D (with last dimension `last`)."""
    if array.ndim != ndim or (last is not None and array.shape[-1] != last):
        hint = f" (pass one scene, e.g. `output.{name}[0]`)" if array.ndim == ndim + 1 else ""
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(array.shape)}{hint}")


def validate_poses(camera_poses: ArrayLike) -> np.ndarray:
    """`(N, 4, 4)` float64 camera-to-world transforms: at least one view, finite, last row `[0, 0, 0, 1]`."""
    poses = to_numpy(camera_poses, "camera_poses").astype(np.float64)
    check_shape(poses, "camera_poses", "(N, 4, 4)", 3)
    if poses.shape[1:] != (4, 4):
        raise ValueError(f"`camera_poses` must have shape (N, 4, 4), got {tuple(poses.shape)}")
    if poses.shape[0] == 0:
        raise ValueError("`camera_poses` holds zero views; at least one view is needed")
    if not np.isfinite(poses).all():
        raise ValueError("`camera_poses` contains NaN or Inf")
    if not np.allclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0], atol=1e-5):
        raise ValueError("`camera_poses` must be camera-to-world transforms with last row [0, 0, 0, 1]")
    return poses


def check_confidence(confidence: ArrayLike, pixels: tuple[int, ...]) -> np.ndarray:
    """`confidence` as float64 of shape `pixels` (`(N, H, W)`, the views' pixels)."""
    scores = to_numpy(confidence, "confidence").astype(np.float64)
    if scores.shape != pixels:
        raise ValueError(
            f"`confidence` must have shape {pixels} to match `world_points` {(*pixels, 3)}, got {tuple(scores.shape)}"
        )
    return scores


def check_images(images: ArrayLike, points_shape: tuple[int, ...]) -> np.ndarray:
    """`images` as uint8 RGB views of `points_shape` (`(N, H, W, 3)`, the shape of the world points they colour)."""
    colours = to_numpy(images, "images")
    check_shape(colours, "images", "(N, H, W, 3)", 4, last=3)
    if colours.shape != points_shape:
        raise ValueError(
            f"`images` {tuple(colours.shape)} must match `world_points` {tuple(points_shape)} (same views and size)"
        )
    if colours.dtype != np.uint8:
        raise ValueError(f"`images` must be uint8 RGB, got dtype {colours.dtype}")
    return colours


def validate_cloud(points: ArrayLike, colours: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """A point cloud: `(M, 3)` finite float32 points, `M >= 1`, and their `(M, 3)` uint8 colours."""
    points = to_numpy(points, "points").astype(np.float32)
    colours = to_numpy(colours, "colours")
    check_shape(points, "points", "(M, 3)", 2, last=3)
    check_shape(colours, "colours", "(M, 3)", 2, last=3)
    if points.shape[0] == 0:
        raise ValueError("`points` is empty")
    if colours.shape[0] != points.shape[0]:
        raise ValueError(f"`colours` has {colours.shape[0]} rows but `points` has {points.shape[0]}")
    if colours.dtype != np.uint8:
        raise ValueError(f"`colours` must be uint8 RGB, got dtype {colours.dtype}")
    if not np.isfinite(points).all():
        raise ValueError("`points` contains NaN or Inf; filter them first with `filter_points`")
    return points, colours


def validate_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """`(height, width)` as positive integers."""
    if len(image_size) != 2 or any(int(side) != side or side < 1 for side in image_size):
        raise ValueError(f"`image_size` must be (height, width) positive integers, got {image_size}")
    return int(image_size[0]), int(image_size[1])


def validate_colour(colour: Sequence[int], name: str) -> tuple[int, int, int]:
    """An RGB colour of three integers in [0, 255] (not floats in [0, 1], which would come out nearly black)."""
    values = tuple(colour) if isinstance(colour, (Sequence, np.ndarray)) and not isinstance(colour, str) else ()
    if len(values) != 3 or not all(is_integer(v) and 0 <= v <= 255 for v in values):
        raise ValueError(f"`{name}` must be three integers in [0, 255] (R, G, B), got {colour!r}")
    return tuple(int(v) for v in values)


def validate_intrinsics(intrinsics: ArrayLike | None, num_views: int) -> np.ndarray | None:
    """`(num_views, 3, 3)` float64 intrinsics (NaN allowed: a view that could not be fitted), or None."""
    if intrinsics is None:
        return None
    matrices = to_numpy(intrinsics, "intrinsics").astype(np.float64)
    if matrices.shape != (num_views, 3, 3):
        hint = " (pass one scene, e.g. `output.intrinsics[0]`)" if matrices.ndim == 4 else ""
        raise ValueError(f"`intrinsics` must have shape ({num_views}, 3, 3), got {tuple(matrices.shape)}{hint}")
    return matrices


def validate_original_sizes(
    original_sizes: Sequence[Sequence[int]] | None, num_views: int, image_size: tuple[int, int] | None
) -> list[tuple[int, int]] | None:
    """One `(height, width)` per view, or None; a warning when they look given as `(width, height)`.

    That is judged by the first view (skipped when `image_size` is None): resized keeping its aspect, it has the
    views' shape whenever its size is right, while a later view may have been squashed to the first one's shape on
    purpose (`resize_views_to_first`)."""
    if original_sizes is None:
        return None
    sizes = [validate_image_size(size) for size in original_sizes]
    if len(sizes) != num_views:
        raise ValueError(f"`original_sizes` has {len(sizes)} entries for {num_views} views")
    if image_size is None or not sizes or not _looks_swapped(sizes[0], image_size):
        return sizes
    swapped = [index for index, size in enumerate(sizes) if _looks_swapped(size, image_size)]  # view 0 among them
    logger.warning(
        f"`original_sizes` are (height, width), but those of view(s) {swapped[:10]} (e.g. {sizes[0]}) have the shape "
        f"of the {image_size[0]}x{image_size[1]} views only once swapped: pass (height, width) (PIL's `image.size` is "
        "(width, height)), or the original intrinsics will be wrong."
    )
    return sizes


def _looks_swapped(size: tuple[int, int], image_size: tuple[int, int], tolerance: float = 0.1) -> bool:
    """Whether the aspect ratio of `size` differs from the views' by more than `tolerance` and that of `size` swapped
    does not (the views are resized keeping their aspect, up to rounding each side to the patch size)."""
    aspect = image_size[1] / image_size[0]

    def fits(height: int, width: int) -> bool:
        return abs(width / height / aspect - 1) <= tolerance

    return not fits(*size) and fits(size[1], size[0])


def validate_view_names(view_names: Sequence[str] | None, num_views: int) -> list[str] | None:
    """One name per view (what the user knows each view by: its file name, or a video frame), or None."""
    if view_names is None:
        return None
    if isinstance(view_names, (str, bytes)) or not all(isinstance(name, str) for name in view_names):
        raise ValueError(f"`view_names` must be a list of {num_views} strings, got {view_names!r}")
    names = list(view_names)
    if len(names) != num_views:
        raise ValueError(f"`view_names` has {len(names)} names for {num_views} views")
    return names


def validate_image_names(
    image_names: Sequence[str] | None, first: int, count: int, *, written_as_png: bool, taken: Sequence[str] = ()
) -> list[str]:
    """The COLMAP names of `count` views numbered from `first`: `image_names` checked, or `view_NNN.png`.

    Each name is a plain file name (it is written into `images/`, never outside it), without spaces (COLMAP's text
    format splits on them), distinct from the others and from `taken`, and ends in `.png` when the view is written
    (the bytes are PNG)."""
    if image_names is None:
        return [f"view_{first + k:03d}.png" for k in range(count)]
    if isinstance(image_names, (str, bytes)):
        raise ValueError(f"`image_names` must be a list of {count} names, got the single string {image_names!r}")
    names = list(image_names)
    bad = [
        name
        for name in names
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in " /\\")
    ]
    if len(names) != count or bad or len(set(names)) != count or set(names) & set(taken):
        problem = f"; not plain file names without spaces: {bad}" if bad else ""
        raise ValueError(f"`image_names` must be {count} new distinct names without spaces, got {names}{problem}")
    if written_as_png:
        not_png = [name for name in names if not name.lower().endswith(".png")]
        if not_png:
            raise ValueError(
                f"`image_names` {not_png} do not end in .png, but the views are written as PNG images; rename them "
                "or pass write_images=False to name images you keep elsewhere"
            )
    return names


@dataclass(frozen=True)
class SceneArrays:
    """One scene's predictions, checked by [`check_scene`]: numpy arrays whose views and pixels agree.

    Attributes:
        camera_poses (`(N, 4, 4)` float64): Camera-to-world transforms, see [`validate_poses`].
        world_points (`(N, H, W, 3)`): Per-pixel 3D points in the world frame (may hold NaN).
        images (`(N, H, W, 3)` uint8): RGB views at the geometry resolution.
        depth (`(N, H, W)`, *optional*): Depth along each camera's z axis.
        confidence (`(N, H, W)` float64, *optional*): Unnormalised confidence, higher is more reliable.
        intrinsics (`(N, 3, 3)` float64, *optional*): Pinhole intrinsics in pixels of the views.
    """

    camera_poses: np.ndarray
    world_points: np.ndarray
    images: np.ndarray
    depth: np.ndarray | None = None
    confidence: np.ndarray | None = None
    intrinsics: np.ndarray | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of the views."""
        return int(self.world_points.shape[1]), int(self.world_points.shape[2])


def check_scene(
    camera_poses: ArrayLike,
    world_points: ArrayLike,
    images: ArrayLike,
    *,
    depth: ArrayLike | None = None,
    confidence: ArrayLike | None = None,
    intrinsics: ArrayLike | None = None,
) -> SceneArrays:
    """Checks one scene's arrays (shapes and dtypes documented in [`SceneArrays`]) against each other.

    Raises:
        ValueError: Naming the first array that is malformed or disagrees with `world_points` or `camera_poses`.
    """
    poses = validate_poses(camera_poses)
    points = to_numpy(world_points, "world_points")
    check_shape(points, "world_points", "(N, H, W, 3)", 4, last=3)
    if points.shape[0] != poses.shape[0]:
        raise ValueError(f"`world_points` has {points.shape[0]} views but `camera_poses` has {poses.shape[0]}")
    colours = check_images(images, points.shape)
    depths = None
    if depth is not None:
        depths = to_numpy(depth, "depth")
        check_shape(depths, "depth", "(N, H, W)", 3)
        if depths.shape != points.shape[:-1]:
            raise ValueError(f"`depth` {tuple(depths.shape)} must match `world_points` {tuple(points.shape)}")
    return SceneArrays(
        camera_poses=poses,
        world_points=points,
        images=colours,
        depth=depths,
        confidence=None if confidence is None else check_confidence(confidence, points.shape[:-1]),
        intrinsics=validate_intrinsics(intrinsics, poses.shape[0]),
    )


def check_reconstruction(
    reconstruction: Any, geometry_pixel_values: torch.Tensor, geometry_image_processor: Any, *, scene: int = 0
) -> SceneArrays:
    """[`check_scene`] of scene `scene` of a model's reconstruction (`G2VLMReconstructionOutput`), coloured by its
    geometry views (`geometry_pixel_values` as the processor made them, unnormalised by `geometry_image_processor`,
    or by the geometry image processor of a `G2VLMProcessor` given instead)."""
    geometry_image_processor = getattr(geometry_image_processor, "geometry_image_processor", geometry_image_processor)
    if not hasattr(geometry_image_processor, "unnormalize"):
        raise ValueError(
            f"Expected the geometry image processor (or the G2VLMProcessor holding it) to unnormalise the views, got "
            f"a {type(geometry_image_processor).__name__}."
        )
    scenes = reconstruction.camera_poses.shape[0]
    if not -scenes <= scene < scenes:
        raise ValueError(f"scene={scene} is out of range: the reconstruction holds {scenes} scene(s).")
    optional = {name: getattr(reconstruction, name, None) for name in ("depth", "confidence", "intrinsics")}
    return check_scene(
        reconstruction.camera_poses[scene],
        reconstruction.world_points[scene],
        geometry_image_processor.unnormalize(geometry_pixel_values[scene].cpu()),
        **{name: None if value is None else value[scene] for name, value in optional.items()},
    )
