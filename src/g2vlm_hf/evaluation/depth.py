"""Depth metrics (AbsRel, squared relative error, RMSE, log RMSE, delta < 1.25^k) after scale alignment.

Protocols (the G²VLM / Pi3 / CUT3R evaluation code that the paper follows):
- monocular depth (NYU-v2, Sintel single frames): every frame aligned on its own, metrics averaged over frames
  weighted by their valid pixels (`per_frame=True`);
- video depth (Sintel, Bonn, KITTI): one scale (or scale and shift) for the whole sequence (`per_frame=False`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .alignment import (
    ArrayLike,
    adam_l1_scale_shift,
    as_float64,
    as_mask,
    l1_scale,
    least_squares_scale,
    least_squares_scale_shift,
    median_scale,
)

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "log_rmse", "delta_1.25", "delta_1.25^2", "delta_1.25^3")


def _scale_only(function: Callable[[torch.Tensor, torch.Tensor], float]):
    return lambda pred, gt: (function(pred, gt), 0.0)


ALIGNMENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]] = {
    "none": lambda pred, gt: (1.0, 0.0),
    "median": _scale_only(median_scale),
    "l1-scale": _scale_only(l1_scale),
    "lstsq-scale": _scale_only(least_squares_scale),
    "lstsq-scale-shift": least_squares_scale_shift,
    "adam-l1-scale-shift": adam_l1_scale_shift,
}


def depth_errors(pred: ArrayLike, gt: ArrayLike) -> dict[str, float]:
    """Metrics over corresponding valid depths (1-D arrays, gt > 0, already aligned)."""
    pred, gt = as_float64(pred, "predicted depth").flatten(), as_float64(gt, "ground-truth depth").flatten()
    if pred.shape != gt.shape or pred.numel() == 0:
        raise ValueError(f"depth_errors needs two non-empty arrays of one size, got {pred.numel()} and {gt.numel()}.")
    difference = pred - gt
    clamped = pred.clamp(min=1e-5)
    ratio = torch.maximum(clamped / gt, gt / clamped)
    return {
        "abs_rel": float((difference.abs() / gt).mean()),
        "sq_rel": float((difference**2 / gt).mean()),
        "rmse": float((difference**2).mean().sqrt()),
        "log_rmse": float(((clamped.log() - gt.log()) ** 2).mean().sqrt()),
        "delta_1.25": float((ratio < 1.25).double().mean()),
        "delta_1.25^2": float((ratio < 1.25**2).double().mean()),
        "delta_1.25^3": float((ratio < 1.25**3).double().mean()),
    }


def valid_depth_mask(gt: torch.Tensor, pred: torch.Tensor, valid: torch.Tensor | None, max_depth: float | None):
    """Pixels with finite positive ground truth (below `max_depth`), finite prediction and `valid` set."""
    mask = torch.isfinite(gt) & (gt > 0) & torch.isfinite(pred)
    if max_depth is not None:
        mask &= gt < max_depth
    if valid is not None:
        mask &= valid
    return mask


def _align_and_score(pred, gt, alignment, clip_max):
    scale, shift = ALIGNMENTS[alignment](pred, gt)
    aligned = scale * pred + shift
    if clip_max is not None:
        aligned = aligned.clamp(max=clip_max)
    metrics = depth_errors(aligned, gt)
    metrics["valid_pixels"] = int(gt.numel())
    metrics["scale"], metrics["shift"] = scale, shift
    return metrics


def evaluate_depth(
    pred: ArrayLike,
    gt: ArrayLike,
    valid: ArrayLike | None = None,
    alignment: str = "median",
    per_frame: bool = True,
    max_depth: float | None = None,
    clip_max: float | None = None,
) -> dict[str, float]:
    """Depth metrics of one sequence.

    Args:
        pred: `(N, H, W)` (or `(H, W)`) predicted depth, same size as `gt` (resize first).
        gt: ground-truth depth; 0, negative or non-finite values are invalid.
        valid: optional boolean mask of the pixels to score.
        alignment: one of `ALIGNMENTS`: "median" (median ratio), "l1-scale" (IRLS least absolute deviation),
            "lstsq-scale", "lstsq-scale-shift", "adam-l1-scale-shift" (the reference's iterative "scale&shift"),
            or "none" (metric depth).
        per_frame: align (and score) each frame on its own, then average weighted by valid pixels; else align the
            whole sequence with one scale (video depth).
        max_depth: ignore ground truth at or beyond this depth (Sintel/Bonn: 70).
        clip_max: clamp aligned predictions to this value (Sintel: 70).

    Returns:
        the metrics of `DEPTH_METRICS`, `valid_pixels`, and for a sequence alignment its `scale` and `shift`.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"Unknown depth alignment {alignment!r}; choose one of {sorted(ALIGNMENTS)}.")
    pred, gt = as_float64(pred, "predicted depth"), as_float64(gt, "ground-truth depth")
    if pred.shape != gt.shape:
        raise ValueError(
            f"Predicted depth {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape; resize the "
            "prediction to the ground-truth size first."
        )
    if pred.ndim not in (2, 3):
        raise ValueError(f"Depth must be (N, H, W) or (H, W), got {tuple(pred.shape)}.")
    valid_tensor = None if valid is None else as_mask(valid, pred.shape)
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
        valid_tensor = None if valid_tensor is None else valid_tensor[None]
    mask = valid_depth_mask(gt, pred, valid_tensor, max_depth)
    if not bool(mask.any()):
        raise ValueError("No valid ground-truth depth in this sequence (all pixels masked out or beyond max_depth).")
    if not per_frame:
        return _align_and_score(pred[mask], gt[mask], alignment, clip_max)
    frames = [_align_and_score(p[m], g[m], alignment, clip_max) for p, g, m in zip(pred, gt, mask) if bool(m.any())]
    return weighted_mean(frames, "valid_pixels")


def weighted_mean(results: list[dict[str, float]], weight_key: str) -> dict[str, float]:
    """Average of the `DEPTH_METRICS` of `results` weighted by `weight_key`; the weights are summed."""
    weights = torch.tensor([float(r[weight_key]) for r in results], dtype=torch.float64)
    merged = {
        key: float((torch.tensor([r[key] for r in results], dtype=torch.float64) * weights).sum() / weights.sum())
        for key in DEPTH_METRICS
    }
    merged[weight_key] = int(weights.sum())
    return merged
