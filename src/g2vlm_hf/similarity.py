"""3D similarity transforms (scale, rotation, translation) and their estimation from corresponding points.

`umeyama` is the closed-form least-squares fit (Umeyama, 1991), optionally weighted. `robust_umeyama` is an
MM-estimate in three stages, after leaving out the points far outside either cloud:

1. a start that outliers under half cannot drag away: least median of squares (Rousseeuw, 1984) over fits of 3 distinct
   random correspondences, or the least-squares fit when its median residual is lower (no outliers). A least-squares
   start alone can be so far off, with a fifth of the correspondences moderate outliers (inside the scene, where the
   far-point filter does not reach), that no reweighting recovers; a Huber stage, which earlier versions ran here,
   drifts from a good start to a wrong one in that case (its threshold grows with the residuals, the scale shrinks);
2. a residual scale from that start: sigma = median residual norm / 1.5382 (the median of the norm of a 3D Gaussian
   error of sigma per axis), which outliers, being fewer than half, barely move;
3. Tukey-biweight refits (redescending) with that scale fixed: weight `(1 - (r / 6 sigma)^2)^2`, 0 beyond 6 sigma, so
   outliers have no influence at all while the inliers keep most of theirs (a least-squares fit on clean data).

Measured on loops in chunks of 16 sharing 4 (the stand-in model of the tests, 0.2% noise, 10% of the points outliers in
each chunk, mean of 10 seeds), the chain's ATE over the ATE with the noise alone: outliers inside the scene (offsets of
half its radius), 1.00 at 240 views and 1.10 at 480, as when the outliers are left out by hand (1.02, 1.09); with the
Huber start of earlier versions 1.17 and 2.07, and with its Huber fit alone 30 and 44; see
`tests/test_alignment_outliers.py`.

Everything is computed in float64 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Points farther from their cloud's median than this many times the median distance are left out before fitting: in
# the least-squares start such points inflate the source variance and shrink the scale towards 0, a start from which
# no reweighting recovers.
FAR_POINT_MULTIPLE = 10.0
# The norm of an isotropic 3D Gaussian error of sigma per axis has median 1.5382 sigma (chi distribution, 3 degrees of
# freedom): the residual scale is read off the median residual norm, which outliers (under half) barely move.
CHI3_MEDIAN = 1.5382
# Tukey's biweight cut-off, in that sigma: inliers (99% within 3.4 sigma) keep weights above 0.45, gross outliers get 0.
TUKEY_SIGMA_MULTIPLE = 6.0
# The robust start tries this many fits of 3 distinct random correspondences, each scored by its median residual over
# at most START_SCORED_POINTS of them: with a fifth of outliers, the chance that no sample is all inliers is
# 0.49^128 = 1e-40.
START_SAMPLES = 128
START_SCORED_POINTS = 1024


def as_float64(array: ArrayLike, name: str) -> torch.Tensor:
    """`array` as a float64 CPU tensor; raises if it is not numeric."""
    tensor = torch.as_tensor(np.ascontiguousarray(array) if not isinstance(array, torch.Tensor) else array)
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.uint8, torch.int16)):
        raise ValueError(f"{name} must be a numeric array, got dtype {tensor.dtype}.")
    return tensor.detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class Similarity:
    """`x -> scale * rotation @ x + translation`: `rotation` `(3, 3)` with det +1, `translation` `(3,)`, float64."""

    scale: float
    rotation: torch.Tensor
    translation: torch.Tensor

    def __post_init__(self) -> None:  # float64 CPU fields whatever was given, so that similarities compose
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation", as_float64(self.rotation, "rotation"))
        object.__setattr__(self, "translation", as_float64(self.translation, "translation"))

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """The transformed points `(..., 3)`, in the points' dtype and device (one pass over them: the scale folded
        into the rotation, the translation added by the same matrix product); integer points come back in the
        default float dtype."""
        if not points.is_floating_point():
            points = points.to(torch.get_default_dtype())
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

    Points of weight 0 take no part (they may be NaN: a mask given as weights).

    Raises:
        ValueError: on mismatched shapes, fewer than 3 points of positive weight, a non-finite point of positive
            weight, or, with the scale, source or target points that all coincide (without it, ICP's use, nothing is
            refused: the rotation of coinciding points is then arbitrary).
    """
    source, target = corresponding_points(source, target, "umeyama")
    weights = torch.ones(source.shape[0], dtype=torch.float64) if weights is None else as_float64(weights, "weights")
    if weights.shape != source.shape[:1] or bool((weights < 0).any()) or not bool(weights.isfinite().all()):
        raise ValueError(
            f"weights must be {source.shape[0]} finite non-negative numbers, got shape {tuple(weights.shape)}."
        )
    used = weights > 0
    if int(used.sum()) < 3:
        raise ValueError(f"umeyama needs at least 3 corresponding points of positive weight, got {int(used.sum())}.")
    source, target, weights = source[used], target[used], weights[used]
    if not (bool(source.isfinite().all()) and bool(target.isfinite().all())):
        raise ValueError("umeyama got NaN or Inf points of positive weight: give them weight 0 or leave them out.")
    scale, rotation, translation, coincident = _fit_similarities(source, target, weights / weights.sum(), with_scale)
    if bool(coincident):
        raise ValueError(
            "The source or the target points all coincide (their spread is under 1e-10 of their distance from the "
            "origin, float64 rounding): a scale cannot be estimated from them."
        )
    return float(scale), rotation, translation


def _fit_similarities(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, with_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Umeyama's closed form for a batch of problems: `source`, `target` `(..., M, 3)`, `weights` `(..., M)` summing
    to 1. Returns scale `(...)`, rotation `(..., 3, 3)`, translation `(..., 3)`, and where the source or the target
    points all coincide `(...)` (no scale: that problem's scale is not finite, or 0)."""
    mean_x = (weights[..., None, :] @ source)[..., 0, :]
    mean_y = (weights[..., None, :] @ target)[..., 0, :]
    x, y = source - mean_x[..., None, :], target - mean_y[..., None, :]
    variance_x = (weights * (x * x).sum(-1)).sum(-1)
    coincident = (
        _coincide(variance_x, source) | _coincide((weights * (y * y).sum(-1)).sum(-1), target)
        if with_scale
        else torch.zeros_like(variance_x, dtype=torch.bool)
    )
    covariance = (y * weights[..., None]).transpose(-1, -2) @ x
    u, singular, vh = torch.linalg.svd(covariance)
    sign = torch.ones_like(singular)
    sign[..., -1] = torch.where(torch.det(u) * torch.det(vh) < 0, -1.0, 1.0)
    rotation = u @ torch.diag_embed(sign) @ vh
    scale = (singular * sign).sum(-1) / variance_x if with_scale else torch.ones_like(variance_x)
    translation = mean_y - scale[..., None] * (rotation @ mean_x[..., None])[..., 0]
    return scale, rotation, translation, coincident


def _coincide(variance: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Whether points `(..., M, 3)` of weighted `variance` `(...)` all coincide: a spread under 1e-10 of their
    distance from the origin, what float64 rounding of the coordinates can make of one point (a few metres of a scan
    in UTM coordinates, millions of metres from the origin, are a spread)."""
    return variance <= 1e-20 * (points * points).sum(-1).amax(-1).clamp(min=1e-300)


def robust_umeyama(
    source: ArrayLike,
    target: ArrayLike,
    weights: ArrayLike | None = None,
    iterations: int = 30,
    tolerance: float = 1e-9,
) -> Similarity:
    """Similarity mapping `source` onto `target`, robust to outliers (see the module docstring for the method).

    Correspondences where either point is not finite, or whose weight is not finite, are dropped first, and so are those
    with a point farther from its cloud's median than 10 times the median distance. The start is the least-squares fit
    or, when its median residual is lower, the best of 128 fits of 3 distinct random correspondences (medians are
    weighted by `weights`); Tukey iterations follow, weighting by `weight * (1 - (residual / (6 sigma))^2)^2` with
    `sigma` the median residual of the start / 1.5382. They stop after `iterations` refits or when the fitted points
    move by less than `tolerance` (relative to the target's extent). The result is deterministic (the draws are seeded).

    Args:
        source: `(M, 3)` points to move.
        target: `(M, 3)` corresponding reference points.
        weights: `(M,)` non-negative prior weights (e.g. confidences), all 1 by default.

    Raises:
        ValueError: when fewer than 3 usable correspondences remain, half of either cloud sits on one point, or the
            source points all coincide.
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
    near = _near_the_bulk(source, prior, "source") & _near_the_bulk(target, prior, "target")
    if int(near.sum()) >= 3:
        source, target, prior = source[near], target[near], prior[near]
    return _redescend(_robust_start(source, target, prior), source, target, prior, iterations, tolerance)


def _robust_start(source: torch.Tensor, target: torch.Tensor, prior: torch.Tensor) -> Similarity:
    """The least-squares fit, or the fit of 3 distinct correspondences drawn at random (among `START_SAMPLES`,
    seeded) when it has the lower median residual: least median of squares (Rousseeuw, 1984), a start that outliers
    under half cannot drag away, where the least-squares start can be so far off that the Huber iterations settle with
    the outliers as inliers (moderate outliers, a fifth of the points)."""
    least_squares = Similarity(*umeyama(source, target, prior))
    generator = torch.Generator().manual_seed(0)
    scored = torch.randperm(source.shape[0], generator=generator)[:START_SCORED_POINTS]
    source, target, prior = source[scored], target[scored], prior[scored]  # the start sees the scored ones only
    # each sample: 3 distinct correspondences (a repeated one leaves the rotation about the line of the other two
    # free, and such a fit can still match a weighted majority exactly: two of three points carrying most of the
    # weight), drawn by prior weight
    drawn = torch.multinomial(prior.expand(START_SAMPLES, -1), 3, replacement=False, generator=generator)
    equal = torch.full((START_SAMPLES, 3), 1.0 / 3.0, dtype=torch.float64)
    scale, rotation, translation, coincident = _fit_similarities(source[drawn], target[drawn], equal)
    moved = scale[:, None, None] * source @ rotation.transpose(1, 2) + translation[:, None]
    medians = weighted_median((moved - target).norm(dim=-1).T, prior)
    medians = medians.masked_fill(coincident | ~scale.isfinite() | (scale <= 0), float("inf"))
    best = int(medians.argmin())
    residual = (least_squares.apply(source) - target).norm(dim=1)
    if not bool(medians[best] < weighted_median(residual, prior)):
        return least_squares
    return Similarity(float(scale[best]), rotation[best], translation[best])


def _redescend(
    fit: Similarity, source: torch.Tensor, target: torch.Tensor, prior: torch.Tensor, iterations: int, tolerance: float
) -> Similarity:
    """Tukey-biweight refits from the robust start `fit`, with the residual scale fixed at its value for `fit` (an
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


def _near_the_bulk(points: torch.Tensor, weights: torch.Tensor, name: str) -> torch.Tensor:
    """The points within `FAR_POINT_MULTIPLE` median distances of the cloud's median. When half of the weight sits on
    one point that distance is 0: all points are kept if that is one or two correspondences (a heavy weight), and a
    ValueError is raised if it is more (coinciding points, which alone would be kept and fitted)."""
    distance = (points - weighted_median(points, weights)).norm(dim=1)
    typical = weighted_median(distance, weights)
    if bool(typical > 0):
        return distance <= FAR_POINT_MULTIPLE * typical
    if int((distance == 0).sum()) >= 3:
        raise ValueError(
            f"Half or more of the {name} points (by weight) coincide at one point, e.g. invalid pixels set to 0: "
            "give those weight 0 or leave them out."
        )
    return torch.ones_like(distance, dtype=torch.bool)


__all__ = ["Similarity", "robust_umeyama", "umeyama"]
