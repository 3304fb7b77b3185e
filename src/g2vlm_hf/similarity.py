"""3D similarity transforms (scale, rotation, translation) and their estimation from corresponding points.

`umeyama` is the closed-form least-squares fit (Umeyama, 1991), optionally weighted. `robust_umeyama` is an
MM-style estimate in three stages, after leaving out the points far outside either cloud:

1. a robust start: iteratively reweighted least squares with Huber weights, whose threshold (2 x the median residual)
   needs no unit (model outputs have an arbitrary scale). Huber is convex, so it cannot settle on a wrong inlier set,
   but its influence is bounded, not zero: every gross outlier still pulls the fit by about the threshold, and under
   noise (where the threshold grows with the residuals) 10% of outliers bias each chunk's scale enough for the bias to
   compound along a chain of chunks;
2. a residual scale from that fit: sigma = median residual norm / 1.5382 (the median of the norm of a 3D Gaussian
   error of sigma per axis), which outliers, being fewer than half, barely move;
3. Tukey-biweight refits (redescending) with that scale fixed: weight `(1 - (r / 6 sigma)^2)^2`, 0 beyond 6 sigma, so
   gross outliers have no influence at all while the inliers keep most of theirs (a least-squares fit on clean data).

Measured on a 240-view loop in chunks of 16 sharing 4 (the stand-in model of the tests, mean of 6 seeds): ATE 5.8e-2
of the extent with 0.2% noise and 10% outliers after stage 1 alone, 5.1e-3 after stage 3, the same as with the noise
alone (5.1e-3); see `tests/test_alignment_outliers.py`.

Everything is computed in float64 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

HUBER_MEDIAN_MULTIPLE = 2.0  # about 3 sigma for the norm of isotropic 3D Gaussian noise (its median is 1.54 sigma)
# Points farther from their cloud's median than this many times the median distance are left out before fitting: in
# the least-squares start such points inflate the source variance and shrink the scale towards 0, a start from which
# no reweighting recovers.
FAR_POINT_MULTIPLE = 10.0
# The norm of an isotropic 3D Gaussian error of sigma per axis has median 1.5382 sigma (chi distribution, 3 degrees of
# freedom): the residual scale is read off the median residual norm, which outliers (under half) barely move.
CHI3_MEDIAN = 1.5382
# Tukey's biweight cut-off, in that sigma: inliers (99% within 3.4 sigma) keep weights above 0.45, gross outliers get 0.
TUKEY_SIGMA_MULTIPLE = 6.0


def as_float64(array: ArrayLike, name: str) -> torch.Tensor:
    """`array` as a float64 CPU tensor; raises if it is not numeric."""
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.uint8, torch.int16)):
        raise ValueError(f"{name} must be a numeric array, got dtype {tensor.dtype}.")
    return tensor.detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class Similarity:
    """`x -> scale * rotation @ x + translation`: `rotation` `(3, 3)` with det +1, `translation` `(3,)`, float64."""

    scale: float
    rotation: torch.Tensor
    translation: torch.Tensor

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """The transformed points `(..., 3)`, in the points' dtype and device (one pass over them: the scale folded
        into the rotation, the translation added by the same matrix product)."""
        linear = (self.scale * self.rotation).to(points.device, points.dtype)
        translation = self.translation.to(points.device, points.dtype)
        return torch.addmm(translation, points.reshape(-1, 3), linear.T).view(points.shape)

    def apply_to_poses(self, camera_poses: torch.Tensor) -> torch.Tensor:
        """Camera-to-world poses `(..., 4, 4)` moved into the new world: rotation composed, position transformed.
        The camera's own frame is scaled too (its local points must be multiplied by `scale`), so that
        `new pose @ (scale * local) == similarity(pose @ local)`."""
        rotation = self.rotation.to(camera_poses.device, camera_poses.dtype)
        moved = camera_poses.clone()
        moved[..., :3, :3] = rotation @ camera_poses[..., :3, :3]
        moved[..., :3, 3] = self.apply(camera_poses[..., :3, 3])
        return moved

    def inverse(self) -> Similarity:
        """The similarity `y -> x` undoing this one."""
        rotation = self.rotation.T
        return Similarity(1.0 / self.scale, rotation, -(rotation @ self.translation) / self.scale)

    def compose(self, inner: Similarity) -> Similarity:
        """`self(inner(x))`."""
        return Similarity(
            self.scale * inner.scale,
            self.rotation @ inner.rotation,
            self.scale * self.rotation @ inner.translation + self.translation,
        )


def corresponding_points(source: ArrayLike, target: ArrayLike, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`source` and `target` as float64 `(M, 3)` tensors of corresponding points; a ValueError naming `caller` else."""
    source, target = as_float64(source, "source points"), as_float64(target, "target points")
    if source.ndim != 2 or source.shape[-1] != 3 or source.shape != target.shape:
        raise ValueError(
            f"{caller} needs two (M, 3) arrays of corresponding points, got {tuple(source.shape)} and "
            f"{tuple(target.shape)}."
        )
    return source, target


def umeyama(
    source: ArrayLike, target: ArrayLike, weights: ArrayLike | None = None, with_scale: bool = True
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Similarity `(s, R, t)` minimising `sum w |s R x + t - y|^2` over corresponding points (Umeyama, 1991);
    with `with_scale=False` the rigid motion (s = 1).

    Args:
        source: `(M, 3)` points `x` (the prediction).
        target: `(M, 3)` points `y` (the reference).
        weights: `(M,)` non-negative weights, all 1 by default.

    Returns:
        scale, rotation `(3, 3)` with det +1, translation `(3,)`; `target ≈ scale * source @ R.T + t`.

    Raises:
        ValueError: on mismatched shapes, fewer than 3 points of positive weight, or source points that all coincide.
    """
    source, target = corresponding_points(source, target, "umeyama")
    weights = torch.ones(source.shape[0], dtype=torch.float64) if weights is None else as_float64(weights, "weights")
    if weights.shape != source.shape[:1] or bool((weights < 0).any()) or not bool(weights.isfinite().all()):
        raise ValueError(
            f"weights must be {source.shape[0]} finite non-negative numbers, got shape {tuple(weights.shape)}."
        )
    if int((weights > 0).sum()) < 3:
        raise ValueError(
            f"umeyama needs at least 3 corresponding points of positive weight, got {int((weights > 0).sum())}."
        )
    weights = weights / weights.sum()
    mean_x, mean_y = weights @ source, weights @ target
    x, y = source - mean_x, target - mean_y
    variance_x = weights @ (x * x).sum(1)
    if with_scale and variance_x <= 1e-12 * max(float((source * source).sum(1).max()), 1e-300):
        raise ValueError("The source points all coincide: a scale cannot be estimated from them.")
    covariance = (y * weights[:, None]).T @ x
    u, singular, vh = torch.linalg.svd(covariance)
    sign = torch.ones(3, dtype=torch.float64)
    if torch.det(u) * torch.det(vh) < 0:
        sign[-1] = -1.0
    rotation = u @ torch.diag(sign) @ vh
    scale = float((singular * sign).sum() / variance_x) if with_scale else 1.0
    translation = mean_y - scale * rotation @ mean_x
    return scale, rotation, translation


def robust_umeyama(
    source: ArrayLike,
    target: ArrayLike,
    weights: ArrayLike | None = None,
    iterations: int = 30,
    tolerance: float = 1e-9,
) -> Similarity:
    """Similarity mapping `source` onto `target`, robust to outliers (see the module docstring for the method).

    Correspondences where either point is not finite, or whose weight is not finite, are dropped first, and so are
    those with a point farther from its cloud's median than 10 times the median distance. Huber iterations then weight
    a point by `weight * min(1, delta / residual)`, `delta` = 2 x the median residual of the current fit (medians are
    weighted by `weights`); Tukey iterations follow, weighting by `weight * (1 - (residual / (6 sigma))^2)^2` with
    `sigma` the median residual of the Huber fit / 1.5382. Each stage stops after `iterations` refits or when the
    fitted points move by less than `tolerance` (relative to the target's extent).

    Args:
        source: `(M, 3)` points to move.
        target: `(M, 3)` corresponding reference points.
        weights: `(M,)` non-negative prior weights (e.g. confidences), all 1 by default.

    Raises:
        ValueError: when fewer than 3 usable correspondences remain, or the source points all coincide.
    """
    source, target = corresponding_points(source, target, "robust_umeyama")
    prior = torch.ones(source.shape[0], dtype=torch.float64) if weights is None else as_float64(weights, "weights")
    usable = source.isfinite().all(1) & target.isfinite().all(1) & prior.isfinite() & (prior > 0)
    if int(usable.sum()) < 3:
        raise ValueError(
            f"Only {int(usable.sum())} of {source.shape[0]} correspondences are usable (finite, with positive weight); "
            "a similarity needs at least 3. The shared views' points are missing or non-finite."
        )
    source, target, prior = source[usable], target[usable], prior[usable]
    near = _near_the_bulk(source, prior) & _near_the_bulk(target, prior)
    if int(near.sum()) >= 3:
        source, target, prior = source[near], target[near], prior[near]
    fit = Similarity(*umeyama(source, target, prior))
    for _ in range(iterations):
        residual = (fit.apply(source) - target).norm(dim=1)
        delta = HUBER_MEDIAN_MULTIPLE * float(weighted_median(residual, prior))
        if delta == 0.0:  # an exact fit for more than half the points: nothing to reweight
            break
        huber = (delta / residual.clamp(min=delta)).clamp(max=1.0)
        refit = Similarity(*umeyama(source, target, prior * huber))
        change = (refit.apply(source) - fit.apply(source)).norm(dim=1).max()
        fit = refit
        if change <= tolerance * float(target.norm(dim=1).max()):
            break
    return _redescend(fit, source, target, prior, iterations, tolerance)


def _redescend(
    fit: Similarity, source: torch.Tensor, target: torch.Tensor, prior: torch.Tensor, iterations: int, tolerance: float
) -> Similarity:
    """Tukey-biweight refits from the Huber fit `fit`, with the residual scale fixed at its value for `fit` (an
    MM-estimate): correspondences beyond `TUKEY_SIGMA_MULTIPLE` sigma get weight 0."""
    residual = (fit.apply(source) - target).norm(dim=1)
    sigma = float(weighted_median(residual, prior)) / CHI3_MEDIAN
    if sigma == 0.0:
        return fit
    cutoff = TUKEY_SIGMA_MULTIPLE * sigma
    for _ in range(iterations):
        tukey = (1.0 - (residual / cutoff).square()).clamp(min=0.0).square()
        if int((tukey > 0).sum()) < 3:
            break
        refit = Similarity(*umeyama(source, target, prior * tukey))
        change = (refit.apply(source) - fit.apply(source)).norm(dim=1).max()
        fit = refit
        residual = (fit.apply(source) - target).norm(dim=1)
        if change <= tolerance * float(target.norm(dim=1).max()):
            break
    return fit


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Median of `values` `(M, ...)` along dim 0, each row counted with its weight `(M,)`."""
    order = values.argsort(dim=0)
    cumulative = weights[order].cumsum(dim=0)
    middle = (cumulative < cumulative[-1:] / 2).sum(dim=0, keepdim=True).clamp(max=values.shape[0] - 1)
    return values.gather(0, order.gather(0, middle))[0]


def _near_the_bulk(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    distance = (points - weighted_median(points, weights)).norm(dim=1)
    return distance <= FAR_POINT_MULTIPLE * weighted_median(distance, weights)


__all__ = ["Similarity", "robust_umeyama", "umeyama"]
