"""Point filters that need no confidence head: a robust (percentile) box, depth edges, black/white background.

Each filter returns a per-pixel boolean mask over a reconstruction's `(N, H, W)` views, True where the point is
kept, so that filters combine with `&` and the same selection can be drawn, written and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .export.points import confidence_mask, confidence_threshold, kept_cloud

# a channel at or below this is "black", at or above 255 minus it "white" (JPEG noise keeps pure colours off 0/255)
BACKGROUND_TOLERANCE = 12


def percentile_box(points: np.ndarray, percentile: float, sample: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis `[percentile, 100 - percentile]` bounds of the finite rows of `points` (`(M, 3)`), from a
    deterministic subsample of at most `sample` points. A few far outliers, which set the bounding box, do not move
    it."""
    if not 0.0 <= percentile < 50.0:
        raise ValueError(f"`percentile` must be in [0, 50), got {percentile}")
    cloud = points.reshape(-1, 3)
    cloud = cloud[np.isfinite(cloud).all(axis=1)]
    if cloud.shape[0] == 0:
        raise ValueError("`points` holds no finite point")
    if cloud.shape[0] > sample:
        cloud = cloud[np.linspace(0, cloud.shape[0] - 1, sample).astype(np.int64)]
    return np.percentile(cloud, percentile, axis=0), np.percentile(cloud, 100.0 - percentile, axis=0)


def inside_box(points: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """`points.shape[:-1]` mask: True where a point lies inside the box `[low, high]`."""
    return ((points >= low) & (points <= high)).all(axis=-1)


def depth_edges(depth: np.ndarray, relative_jump: float) -> np.ndarray:
    """`(N, H, W)` mask of depth-edge pixels: where the depth jumps to a 4-neighbour by more than `relative_jump`
    times the pixel's own depth. Points there are smeared between the foreground and the background."""
    depth = np.asarray(depth, dtype=np.float64)
    jump = np.zeros_like(depth)
    vertical = np.abs(np.diff(depth, axis=1))
    horizontal = np.abs(np.diff(depth, axis=2))
    jump[:, 1:] = np.maximum(jump[:, 1:], vertical)
    jump[:, :-1] = np.maximum(jump[:, :-1], vertical)
    jump[:, :, 1:] = np.maximum(jump[:, :, 1:], horizontal)
    jump[:, :, :-1] = np.maximum(jump[:, :, :-1], horizontal)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ~(jump <= relative_jump * np.abs(depth))


def background(images: np.ndarray, *, black: bool, white: bool) -> np.ndarray:
    """`(N, H, W)` mask of background pixels: (near) black and/or (near) white in every channel."""
    mask = np.zeros(images.shape[:-1], dtype=bool)
    if black:
        mask |= (images <= BACKGROUND_TOLERANCE).all(axis=-1)
    if white:
        mask |= (images >= 255 - BACKGROUND_TOLERANCE).all(axis=-1)
    return mask


@dataclass(frozen=True)
class PointSelection:
    """What to keep of a reconstruction's points (every field off keeps every finite point).

    Attributes:
        outlier_percentile: Drop the points outside the per-axis `[p, 100 - p]` percentile box (0 keeps all).
        depth_edge_jump: Drop depth-edge pixels, see [`depth_edges`] (0 keeps all).
        drop_black, drop_white: Drop (near) black / white pixels (a background).
        views: Keep only these views' points (None: all views).
        confidence_percentile: Drop the points below this confidence percentile (ignored without confidence).
        max_points: At most this many points, drawn uniformly at random (seeded, in their original order).
    """

    outlier_percentile: float = 0.0
    depth_edge_jump: float = 0.0
    drop_black: bool = False
    drop_white: bool = False
    views: Sequence[int] | None = None
    confidence_percentile: float = 0.0
    max_points: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.outlier_percentile < 50.0:
            raise ValueError(f"`outlier_percentile` must be in [0, 50), got {self.outlier_percentile}")
        if not 0.0 <= self.confidence_percentile <= 100.0:
            raise ValueError(f"`confidence_percentile` must be in [0, 100], got {self.confidence_percentile}")
        if not self.depth_edge_jump >= 0.0:
            raise ValueError(f"`depth_edge_jump` must be at least 0, got {self.depth_edge_jump}")
        if self.max_points is not None and self.max_points < 1:
            raise ValueError(f"`max_points` must be at least 1, got {self.max_points}")


def keep_mask(
    world_points: np.ndarray,
    images: np.ndarray,
    depth: np.ndarray,
    confidence: np.ndarray | None,
    selection: PointSelection,
) -> np.ndarray:
    """`(N, H, W)` mask of the points that `selection` keeps (before the `max_points` subsample): finite points with a
    finite confidence (the export's [`confidence_mask`], so the page and the files keep the same points), then the
    view, background, depth-edge, confidence and outlier filters."""
    percentile = selection.confidence_percentile if confidence is not None else None
    keep = confidence_mask(world_points, confidence, None if percentile is None else 0.0)
    if selection.views is not None:
        chosen = np.zeros(keep.shape[0], dtype=bool)
        chosen[list(selection.views)] = True
        keep &= chosen[:, None, None]
    if selection.drop_black or selection.drop_white:
        keep &= ~background(images, black=selection.drop_black, white=selection.drop_white)
    if selection.depth_edge_jump > 0:
        keep &= ~depth_edges(depth, selection.depth_edge_jump)
    if percentile and keep.any():  # the percentile of the points still kept, not of every point
        keep &= confidence >= confidence_threshold(confidence[keep], percentile)
    if selection.outlier_percentile > 0 and keep.any():
        low, high = percentile_box(world_points[keep], selection.outlier_percentile)
        keep &= inside_box(world_points, low, high)
    return keep


def select_points(
    world_points: np.ndarray,
    colours: np.ndarray,
    depth: np.ndarray,
    confidence: np.ndarray | None,
    selection: PointSelection,
    *,
    images: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The kept points (`(M, 3)` float32), their colours (`(M, 3)` uint8, from `colours` `(N, H, W, 3)`) and the
    number kept before the `max_points` subsample: the filters first, then at most `max_points` of the points that
    pass, drawn by the export's [`kept_cloud`]. `images` (default `colours`) are the views' own pixels, for the
    background filters.

    Raises:
        ValueError: When every point is filtered away (the message says by what).
    """
    images = colours if images is None else images
    keep = keep_mask(world_points, images, depth, confidence, selection)
    kept = int(keep.sum())
    if kept == 0:
        raise ValueError(
            "Every point is filtered away: loosen the filters (outliers, depth edges, background, view, confidence); "
            "points that are not finite, or whose confidence is NaN, are always left out."
        )
    points, point_colours = kept_cloud(world_points, colours, keep, max_points=selection.max_points, seed=seed)
    return points, point_colours, kept
