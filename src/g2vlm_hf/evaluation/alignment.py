"""Closed-form alignments of a prediction to the ground truth: depth scale (and shift), and 3D similarity (Umeyama, from
`g2vlm_hf.similarity`).

All functions take torch tensors or numpy arrays, compute in float64 and return python floats or float64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from ..similarity import ArrayLike, Similarity, as_float64
from ..similarity import umeyama as umeyama  # re-exported: the evaluation API names it here


def as_mask(valid: ArrayLike, shape: torch.Size, name: str = "valid mask") -> torch.Tensor:
    """`valid` as a boolean tensor of `shape`; raises a ValueError naming both shapes if they differ."""
    mask = torch.as_tensor(np.asarray(valid) if not isinstance(valid, torch.Tensor) else valid).bool()
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"The {name} has shape {tuple(mask.shape)}; it must match the data, {tuple(shape)}.")
    return mask


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} must have the same shape.")
    if pred.numel() == 0:
        raise ValueError("No valid pixels to align: check the valid mask and the ground-truth depth range.")


def median_scale(pred: ArrayLike, gt: ArrayLike) -> float:
    """Scale `s = median(gt) / median(pred)` (the per-frame protocol of monocular depth benchmarks)."""
    pred, gt = as_float64(pred, "prediction").flatten(), as_float64(gt, "ground truth").flatten()
    _check_pair(pred, gt)
    return float(gt.median() / pred.median())


def least_squares_scale(pred: ArrayLike, gt: ArrayLike) -> float:
    """Scale minimising `sum (s * pred - gt)^2`: `s = <pred, gt> / <pred, pred>`."""
    pred, gt = as_float64(pred, "prediction").flatten(), as_float64(gt, "ground truth").flatten()
    _check_pair(pred, gt)
    return float((pred * gt).sum() / (pred * pred).sum())


def l1_scale(pred: ArrayLike, gt: ArrayLike, iterations: int = 10, eps: float = 1e-8) -> float:
    """Scale minimising `sum |s * pred - gt|`, by iteratively reweighted least squares.

    Starts from `mean(gt) / mean(pred)` and runs `iterations` weighted least-squares steps with weights
    `1 / (|s * pred - gt| + eps)`; the result is clamped to at least 1e-3. This is the "scale" alignment of the video
    and monocular depth protocols of CUT3R / Pi3 / G²VLM's evaluation code.
    """
    pred, gt = as_float64(pred, "prediction").flatten(), as_float64(gt, "ground truth").flatten()
    _check_pair(pred, gt)
    scale = gt.mean() / pred.mean()
    for _ in range(iterations):
        weights = 1.0 / ((scale * pred - gt).abs() + eps)
        scale = (weights * pred * gt).sum() / (weights * pred * pred).sum()
    return float(scale.clamp(min=1e-3))


def least_squares_scale_shift(pred: ArrayLike, gt: ArrayLike) -> tuple[float, float]:
    """Scale and shift minimising `sum (s * pred + t - gt)^2` (closed form of the 2x2 normal equations)."""
    pred, gt = as_float64(pred, "prediction").flatten(), as_float64(gt, "ground truth").flatten()
    _check_pair(pred, gt)
    design = torch.stack([pred, torch.ones_like(pred)], dim=1)
    solution = torch.linalg.lstsq(design, gt[:, None]).solution[:, 0]
    return float(solution[0]), float(solution[1])


def adam_l1_scale_shift(
    pred: ArrayLike, gt: ArrayLike, lr: float = 1e-4, max_steps: int = 1000, tolerance: float = 1e-6
) -> tuple[float, float]:
    """Scale and shift lowering `sum |s * pred + t - gt|` by Adam from `s = median(gt) / median(pred)`, `t = 0`.

    Not a closed form: this is the "scale&shift" alignment of the video-depth protocol in G²VLM's / Pi3's evaluation
    code (learning rate 1e-4, 1e-3 for NYU-v2; at most `max_steps` steps, stopping when the loss changes by less
    than `tolerance`), reproduced so that its numbers can be compared. Runs in float64 on the CPU.
    """
    pred, gt = as_float64(pred, "prediction").flatten(), as_float64(gt, "ground truth").flatten()
    _check_pair(pred, gt)
    scale = (gt.median() / pred.median()).reshape(1).clone().requires_grad_(True)
    shift = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([scale, shift], lr=lr)
    previous = None
    with torch.enable_grad():
        for _ in range(max_steps):
            optimizer.zero_grad()
            loss = (scale * pred + shift - gt).abs().sum()
            loss.backward()
            optimizer.step()
            if previous is not None and abs(previous - loss.item()) < tolerance:
                break
            previous = loss.item()
    return float(scale.detach()), float(shift.detach())


def apply_similarity(
    points: ArrayLike, scale: float, rotation: torch.Tensor, translation: torch.Tensor
) -> torch.Tensor:
    """`scale * R p + t` for points `(..., 3)`, in float64."""
    return Similarity(scale, rotation, translation).apply(as_float64(points, "points"))
