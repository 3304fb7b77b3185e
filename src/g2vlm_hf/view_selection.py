"""Which few views of a long reconstruction a question is asked on: spread over the places the cameras visited
(coverage), or evenly over the sequence (uniform)."""

from __future__ import annotations

import numpy as np
from transformers.utils import logging

from .inputs import uniform_indices

logger = logging.get_logger(__name__)

VIEW_CHOICES = ("coverage", "uniform")


def coverage_indices(camera_poses: np.ndarray, count: int) -> list[int]:
    """At most `count` views whose cameras cover the scene: greedy farthest-point selection on each camera's centre
    (in units of the trajectory's median spread) and viewing direction, starting from the first view with a usable
    (finite) camera. Views whose camera repeats a chosen one (same place and direction) or is not usable are never
    taken, so fewer than `count` come back when the cameras visit fewer places (none when no camera is usable).
    Returned in sequence order.

    Args:
        camera_poses: `(N, 4, 4)` camera-to-world poses.
        count: How many views at most.
    """
    poses = np.asarray(camera_poses, dtype=np.float64)
    if not len(poses) or count < 1:
        return []
    centres, directions = poses[:, :3, 3], poses[:, :3, 2]
    usable = np.isfinite(centres).all(axis=1) & np.isfinite(directions).all(axis=1)
    if not usable.any():
        return []
    known = centres[usable]  # the spread of the usable cameras: one NaN camera made it NaN, and the unit world units
    spread = float(np.median(np.linalg.norm(known - np.median(known, axis=0), axis=1)))
    features = np.concatenate([centres / (spread if spread > 0 else 1.0), directions], axis=1)
    features[~usable] = np.nan  # a view without a usable camera is never chosen
    first = int(np.argmax(usable))
    chosen = [first]
    distance = np.linalg.norm(features - features[first], axis=1)
    while len(chosen) < count:
        candidate = int(np.nanargmax(np.where(np.isnan(distance), -1.0, distance)))
        if not distance[candidate] > 1e-6:  # only repeats of chosen places are left
            break
        chosen.append(candidate)
        distance = np.fmin(distance, np.linalg.norm(features - features[candidate], axis=1))
    return sorted(chosen)


def choose_views(camera_poses: np.ndarray, count: int, by: str) -> list[int]:
    """`count` view indices chosen `by` "coverage" ([`coverage_indices`]) or "uniform" (evenly over the sequence)."""
    if by not in VIEW_CHOICES:
        raise ValueError(f"Views are chosen by one of {VIEW_CHOICES}, got {by!r}.")
    if by == "coverage":
        chosen = coverage_indices(camera_poses, count)
        if chosen or not len(camera_poses) or count < 1:
            return chosen
        logger.warning("No view has a usable camera to choose views by coverage: choosing them evenly instead.")
    return uniform_indices(len(camera_poses), count)


__all__ = ["VIEW_CHOICES", "choose_views", "coverage_indices"]
