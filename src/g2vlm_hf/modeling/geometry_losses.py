"""Reconstruction losses of the official recipe (Pi3-style): a scale-aligned local point-map loss, a global point-map
loss and an affine-invariant relative camera-pose loss.

Targets and predictions are brought to a common, scale-free frame first: the targets into the first camera's frame
and normalised by their mean point distance, the predictions normalised by their own mean point distance; then one
optimal scale (weighted L1, no gradient) aligns the predicted local points to the targets, and is applied to the
global points and the camera translations too. With a confidence head, the confidence learns (binary cross-entropy)
whether each pixel's aligned local point lies within `confidence_threshold` of the truth. Not included from the
official recipe: the surface-normal term (used there for some datasets only) and the sky part of the confidence
term (it needs a sky segmenter).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .rigid import invert_rigid, transform_points
from .tensor_checks import require_tensor


@dataclass
class G2VLMGeometryLossWeights:
    """Weights of the named terms in the total geometry loss (defaults: the official recipe)."""

    local_points: float = 1.0
    global_points: float = 1.0
    camera: float = 0.2
    camera_translation: float = 100.0  # inside the camera term: translation_weight * translation + rotation
    confidence: float = 0.05
    confidence_threshold: float = 0.02  # aligned local-point error below which a pixel counts as reliable


def scale_translations(poses: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`poses` `(B, N, 4, 4)` with their translations multiplied by `factor` `(B,)` (out of place, for autograd)."""
    translations = poses[..., :3, 3:] * factor.view(-1, 1, 1, 1)
    return torch.cat([torch.cat([poses[..., :3, :3], translations], dim=-1), poses[..., 3:, :]], dim=-2)


def mean_distance(points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean norm of the valid points of each scene: `(B,)`."""
    distances = points.norm(dim=-1) * mask
    return distances.flatten(1).sum(-1) / mask.flatten(1).sum(-1).clamp_min(1)


@torch.no_grad()
def weighted_l1_scale(source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The magnitude of the scale `a` minimising `sum w * |a * x - y|` over the coordinates of one scene (a weighted
    median of y / x; a mirrored prediction's negative minimiser is taken by its size).

    Args:
        source, target: `(n, 3)` points; weight: `(n,)`.
    """
    x, y = source.flatten(), target.flatten()
    w = weight[:, None].expand(-1, 3).flatten() * x.abs()
    keep = x.abs() > 1e-8
    ratios, w = (y[keep] / x[keep]), w[keep]
    if ratios.numel() == 0:
        return torch.ones((), dtype=source.dtype, device=source.device)
    ratios, order = ratios.sort()
    cumulative = w[order].cumsum(0)
    median = torch.searchsorted(cumulative, cumulative[-1] / 2).clamp_max(ratios.numel() - 1)
    return ratios[median].abs()


def rotation_angle(rotations: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Geodesic angle between rotation matrices `(..., 3, 3)`, in radians."""
    trace = torch.diagonal(rotations.transpose(-1, -2) @ targets, dim1=-2, dim2=-1).sum(-1)
    return torch.acos(((trace - 1) / 2).clamp(-1 + eps, 1 - eps))


def relative_poses(poses: torch.Tensor) -> torch.Tensor:
    """`inv(P_i) @ P_j` for every ordered pair i != j of each scene: `(B, N * (N - 1), 4, 4)`."""
    views = poses.shape[1]
    pairs = invert_rigid(poses)[:, :, None] @ poses[:, None, :]
    off_diagonal = ~torch.eye(views, dtype=torch.bool, device=poses.device)
    return pairs[:, off_diagonal]


def geometry_losses(
    prediction: dict[str, torch.Tensor | None],
    world_points: torch.Tensor,
    valid_mask: torch.Tensor,
    camera_poses: torch.Tensor,
    weights: G2VLMGeometryLossWeights | None = None,
) -> dict[str, torch.Tensor]:
    """Named reconstruction losses and their weighted `total`.

    Args:
        prediction: the geometry heads' output (`local_points`, `camera_poses`, optionally `global_points`).
        world_points: `(B, N, H, W, 3)` ground-truth points in any world frame.
        valid_mask: `(B, N, H, W)` bool, True where `world_points` is known (points that are not finite or lie
            behind their camera are left out as well; unknown points may hold anything, NaN included); a scene with no
            such point takes no part in the losses.
        camera_poses: `(B, N, 4, 4)` ground-truth camera-to-world transforms in the same frame.
        weights: term weights (defaults: the official recipe).
    """
    weights = weights or G2VLMGeometryLossWeights()
    world_points, camera_poses = world_points.float(), camera_poses.float()
    mask = valid_mask.bool()
    if int(mask.sum()) == 0:
        raise ValueError("geometry_targets['valid_mask'] marks no valid pixel: the geometry loss needs known points.")
    # a target point behind its camera is no pixel's depth: leaving it in would make the depth weights negative, and
    # it must not count in the target scale either (NaN compares False: a non-finite point is left out too)
    mask = mask & (transform_points(invert_rigid(camera_poses), world_points)[..., 2] > 0)
    mask = mask & torch.isfinite(world_points).all(-1)
    if int(mask.sum()) == 0:
        raise ValueError("No valid target point lies in front of its camera: check geometry_targets' frames.")
    # what unknown points hold never reaches a sum, nor the gradient (0 * NaN is NaN)
    world_points = torch.where(mask[..., None], world_points, 0.0)

    # targets: first camera's frame, unit mean distance
    to_first = invert_rigid(camera_poses[:, :1])
    target_poses = to_first @ camera_poses
    target_global = transform_points(to_first.expand_as(camera_poses), world_points)
    target_scale = mean_distance(target_global, mask).clamp_min(1e-8)
    target_global = target_global / target_scale.view(-1, 1, 1, 1, 1)
    target_poses = scale_translations(target_poses, 1.0 / target_scale)
    target_local = transform_points(invert_rigid(target_poses), target_global)
    scenes = mask.flatten(1).any(1)
    if not bool(scenes.all()):
        # a scene without a known point (a chat sample's views in a mixed batch) takes no part: its target scale
        # would be the 1e-8 floor, and its camera translations scaled by 1e8
        prediction = {
            name: None if prediction.get(name) is None else prediction[name][scenes]
            for name in ("local_points", "camera_poses", "global_points", "confidence")
        }
        target_poses, target_global, target_local, mask = (
            tensor[scenes] for tensor in (target_poses, target_global, target_local, mask)
        )

    # predictions: unit mean distance of the local points
    local = prediction["local_points"].float()
    predicted_scale = mean_distance(local, mask).clamp_min(1e-8).view(-1, 1, 1, 1, 1)
    local = local / predicted_scale

    # per-pixel weights: closer points count more; then one optimal scale per scene
    depth = target_local[..., 2]
    view_mean = (depth * mask).flatten(2).sum(-1) / mask.flatten(2).sum(-1).clamp_min(1)
    pixel_weight = 1.0 / (torch.maximum(depth, 0.1 * view_mean[..., None, None]) + 1e-6)
    scale = torch.stack(
        [
            weighted_l1_scale(local[b][mask[b]], target_local[b][mask[b]], pixel_weight[b][mask[b]])
            for b in range(len(local))
        ]
    ).view(-1, 1, 1, 1, 1)

    def point_errors(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((scale * predicted - target).abs() * pixel_weight[..., None])[mask]

    local_errors = point_errors(local, target_local)
    losses = {"local_points": local_errors.mean()}
    total = weights.local_points * losses["local_points"]
    if prediction.get("confidence") is not None:
        reliable = (local_errors.detach().mean(-1) < weights.confidence_threshold).float()
        losses["confidence"] = F.binary_cross_entropy_with_logits(prediction["confidence"].float()[mask], reliable)
        total = total + weights.confidence * losses["confidence"]
    if prediction.get("global_points") is not None:
        losses["global_points"] = point_errors(
            prediction["global_points"].float() / predicted_scale, target_global
        ).mean()
        total = total + weights.global_points * losses["global_points"]

    poses = scale_translations(prediction["camera_poses"].float(), scale.view(-1) / predicted_scale.view(-1))
    if poses.shape[1] > 1:
        predicted_pairs, target_pairs = relative_poses(poses), relative_poses(target_poses)
        losses["camera_translation"] = F.huber_loss(predicted_pairs[..., :3, 3], target_pairs[..., :3, 3], delta=0.1)
        losses["camera_rotation"] = rotation_angle(predicted_pairs[..., :3, :3], target_pairs[..., :3, :3]).mean()
        losses["camera"] = weights.camera_translation * losses["camera_translation"] + losses["camera_rotation"]
        total = total + weights.camera * losses["camera"]
    losses["total"] = total
    return losses


def check_geometry_targets(targets: dict[str, torch.Tensor], batch: int, views: int, height: int, width: int) -> None:
    """Raise an error naming the first target that is missing, not a tensor (TypeError) or not of the geometry
    views' shape."""
    expected = {
        "world_points": (batch, views, height, width, 3),
        "valid_mask": (batch, views, height, width),
        "camera_poses": (batch, views, 4, 4),
    }
    for name, shape in expected.items():
        if name not in targets:
            raise ValueError(f"geometry_targets needs '{name}' of shape {shape}; it has {sorted(targets)}.")
        require_tensor(f"geometry_targets['{name}']", targets[name])
        if tuple(targets[name].shape) != shape:
            raise ValueError(
                f"geometry_targets['{name}'] has shape {tuple(targets[name].shape)} but the geometry views "
                f"(batch {batch}, {views} views of {height}x{width}) need {shape}."
            )
