"""Camera-pose metrics over all view pairs: relative rotation / translation angle errors, their accuracy at
thresholds (RRA@t, RTA@t) and AUC@30 (the Co3Dv2 / RealEstate10K protocol of PoseDiffusion and VGGT).

For every pair i < j the relative transform from camera i to camera j is compared between prediction and ground
truth. Rotation error: the angle of `R_gt^T R_pred`. Translation error: the angle between the two relative
translation directions, folded to [0, 90] degrees (sign ambiguity); a zero-length translation scores 90 degrees.
The errors are invariant to a global similarity of either trajectory.
"""

from __future__ import annotations

import numpy as np
import torch

from ..modeling.rigid import invert_rigid
from .alignment import ArrayLike, as_float64


def _check_poses(poses: torch.Tensor, name: str) -> None:
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"{name} must be (N, 4, 4) camera-to-world matrices, got {tuple(poses.shape)}.")


def rotation_angle_degrees(rotation_a: torch.Tensor, rotation_b: torch.Tensor) -> torch.Tensor:
    """Angle (degrees) of `A^T B` for rotation batches `(P, 3, 3)`."""
    relative = rotation_a.transpose(1, 2) @ rotation_b
    cosine = ((relative.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosine))


def direction_angle_degrees(vectors_a: torch.Tensor, vectors_b: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """Angle (degrees) between the lines of `(P, 3)` vectors, in [0, 90]; 90 where either is zero."""
    a = vectors_a / (vectors_a.norm(dim=-1, keepdim=True) + eps)
    b = vectors_b / (vectors_b.norm(dim=-1, keepdim=True) + eps)
    # atan2 of |sin| and |cos| stays accurate near 0 degrees, where arccos of the cosine loses half the digits
    angle = torch.atan2(torch.linalg.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1).abs())
    return torch.where(
        (a.norm(dim=-1) == 0) | (b.norm(dim=-1) == 0), torch.full_like(angle, 90.0), torch.rad2deg(angle)
    )


PAIR_DIRECTIONS = ("i_to_j", "j_to_i")


def relative_pose_errors(
    pred_c2w: ArrayLike, gt_c2w: ArrayLike, direction: str = "i_to_j"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation and translation errors (degrees) of every pair i < j of views (order of `itertools.combinations`).

    `direction` picks the relative transform compared: "i_to_j" maps camera i's frame to camera j's (G²VLM's and
    Pi3's evaluation code), "j_to_i" the inverse (VGGT's `test_co3d.py`). Rotation errors are the same either way;
    translation directions differ, hence the translation errors and AUC differ slightly.
    """
    if direction not in PAIR_DIRECTIONS:
        raise ValueError(f"Unknown pair direction {direction!r}; choose one of {PAIR_DIRECTIONS}.")
    pred, gt = as_float64(pred_c2w, "predicted poses"), as_float64(gt_c2w, "ground-truth poses")
    _check_poses(pred, "predicted poses")
    _check_poses(gt, "ground-truth poses")
    if pred.shape != gt.shape or pred.shape[0] < 2:
        raise ValueError(f"Need the same number (>= 2) of predicted and true poses, got {len(pred)} and {len(gt)}.")
    first, second = torch.combinations(torch.arange(pred.shape[0]), 2).unbind(-1)
    if direction == "j_to_i":
        first, second = second, first
    # camera i -> camera j: world_to_camera_j @ camera_to_world_i
    relative_pred = invert_rigid(pred[second]) @ pred[first]
    relative_gt = invert_rigid(gt[second]) @ gt[first]
    rotation_error = rotation_angle_degrees(relative_gt[:, :3, :3], relative_pred[:, :3, :3])
    translation_error = direction_angle_degrees(relative_gt[:, :3, 3], relative_pred[:, :3, 3])
    return rotation_error, translation_error


def pose_auc(rotation_errors: ArrayLike, translation_errors: ArrayLike, max_threshold: int = 30) -> float:
    """AUC of the accuracy curve of `max(rotation, translation)` error over integer thresholds 1..`max_threshold`.

    Equals the mean over k = 1..max_threshold of the fraction of pairs with error < k (error <= max_threshold for
    the last one): the histogram-and-cumulative-sum definition of PoseDiffusion / VGGT. Returns a fraction in [0, 1].
    """
    errors = torch.maximum(as_float64(rotation_errors, "rotation errors"), as_float64(translation_errors, "errors"))
    errors = errors.flatten().numpy()
    if errors.size == 0:
        raise ValueError("pose_auc needs at least one pair of views.")
    below = [(errors < k).mean() for k in range(1, max_threshold)]
    below.append((errors <= max_threshold).mean())
    return float(np.mean(below))


def evaluate_poses(
    pred_c2w: ArrayLike,
    gt_c2w: ArrayLike,
    thresholds: tuple[float, ...] = (5.0, 15.0, 30.0),
    direction: str = "i_to_j",
) -> dict[str, float]:
    """RRA@t, RTA@t (fraction of pairs with error < t), AUC@30 and mean errors of one scene's trajectory."""
    rotation_error, translation_error = relative_pose_errors(pred_c2w, gt_c2w, direction)
    return summarize_pose_errors(rotation_error, translation_error, thresholds)


def summarize_pose_errors(
    rotation_error: torch.Tensor, translation_error: torch.Tensor, thresholds: tuple[float, ...] = (5.0, 15.0, 30.0)
) -> dict[str, float]:
    """Pose metrics of pooled pair errors (degrees)."""
    metrics = {}
    for threshold in thresholds:
        metrics[f"rra@{threshold:g}"] = float((rotation_error < threshold).double().mean())
        metrics[f"rta@{threshold:g}"] = float((translation_error < threshold).double().mean())
    metrics["auc@30"] = pose_auc(rotation_error, translation_error, 30)
    metrics["rotation_error_mean"] = float(rotation_error.mean())
    metrics["translation_error_mean"] = float(translation_error.mean())
    metrics["pairs"] = int(rotation_error.numel())
    return metrics
