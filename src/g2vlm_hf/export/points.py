"""Which of a scene's per-pixel points an export keeps: finite ones, above a confidence percentile, at most a number.

The filters that need no confidence (outlier box, depth edges, background) are in `g2vlm_hf.point_filters`.
"""

from __future__ import annotations

import numpy as np
from transformers.utils import logging

from .validation import ArrayLike, check_confidence, check_images, check_shape, to_numpy

logger = logging.get_logger(__name__)

__all__ = ["compute_keep_mask", "confidence_mask", "filter_points", "kept_cloud", "subsample"]


def confidence_mask(
    points: np.ndarray, confidence: np.ndarray | None, confidence_percentile: float | None
) -> np.ndarray:
    """[`compute_keep_mask`] of checked arrays: `(N, H, W, 3)` points and `(N, H, W)` confidence (or None)."""
    keep = np.isfinite(points).all(axis=-1)
    if confidence_percentile is None:
        return keep
    if not 0.0 <= confidence_percentile <= 100.0:
        raise ValueError(f"`confidence_percentile` must be in [0, 100], got {confidence_percentile}")
    if confidence is None:
        # once per process: one scene goes through several writers (its files, then COLMAP's), a stream chunk by chunk
        logger.warning_once("`confidence_percentile` is ignored: this reconstruction has no confidence")
        return keep
    keep &= ~np.isnan(confidence)  # +inf is the most confident value there is (an overflowed exp), not an invalid one
    if keep.any() and confidence_percentile > 0.0:
        keep &= confidence >= confidence_threshold(confidence[keep], confidence_percentile)
    return keep


def confidence_threshold(confidence: np.ndarray, percentile: float) -> float:
    """The `percentile` of the (non-NaN) `confidence` values, infinities ranked as the largest / smallest values
    (numpy's interpolation gives NaN next to an infinity)."""
    if np.issubdtype(confidence.dtype, np.floating):
        limit = np.finfo(confidence.dtype).max
        confidence = np.clip(confidence, -limit, limit)
    return np.percentile(confidence, percentile)


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
        `(N, H, W)` bool: True where the point is finite (and, when filtering by confidence, its confidence is not NaN
        and at least the percentile).

    Raises:
        ValueError: On wrong shapes or a percentile outside `[0, 100]`.
    """
    points = to_numpy(world_points, "world_points")
    check_shape(points, "world_points", "(N, H, W, 3)", 4, last=3)
    scores = None
    if confidence is not None and confidence_percentile is not None:
        scores = check_confidence(confidence, points.shape[:-1])
    return confidence_mask(points, scores, confidence_percentile)


def subsample(count: int, max_points: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of `max_points` of `count` items drawn uniformly at random without replacement (seeded), or
    None when all `count` are kept.

    Raises:
        ValueError: When `max_points < 1`.
    """
    if max_points is None:
        return None
    if max_points < 1:
        raise ValueError(f"`max_points` must be at least 1, got {max_points}")
    if count <= max_points:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=max_points, replace=False))


def kept_cloud(
    points: np.ndarray, colours: np.ndarray, keep: np.ndarray, *, max_points: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The points and colours where `keep` (then at most `max_points` of them): `(M, 3)` float32 and uint8.

    Raises:
        ValueError: When `keep` keeps nothing, or `max_points < 1`.
    """
    with np.errstate(over="ignore"):
        kept_points = points[keep].astype(np.float32)
    kept_colours = colours[keep]
    if kept_points.shape[0] == 0:
        raise ValueError(
            f"All {keep.size} points were filtered away (non-finite points or confidence below the percentile)"
        )
    if not np.isfinite(kept_points).all():
        raise ValueError("Some points lie beyond the float32 range (about 3.4e38), in which point clouds are written")
    chosen = subsample(kept_points.shape[0], max_points, seed)
    if chosen is not None:
        kept_points, kept_colours = kept_points[chosen], kept_colours[chosen]
    logger.info(f"Keeping {kept_points.shape[0]} of {keep.size} points")
    return np.ascontiguousarray(kept_points), np.ascontiguousarray(kept_colours)


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
    points = to_numpy(world_points, "world_points")
    check_shape(points, "world_points", "(N, H, W, 3)", 4, last=3)
    colours = check_images(images, points.shape)
    if max_points is not None and max_points < 1:
        raise ValueError(f"`max_points` must be at least 1, got {max_points}")
    if points.shape[0] == 0:
        raise ValueError("`world_points` holds zero views; at least one view is needed")
    keep = compute_keep_mask(points, confidence, confidence_percentile=confidence_percentile)
    return kept_cloud(points, colours, keep, max_points=max_points, seed=seed)
