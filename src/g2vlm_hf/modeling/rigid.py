"""Rigid transforms `(..., 4, 4)` (camera-to-world poses): closed-form inverse and application to point maps."""

from __future__ import annotations

import torch


def invert_rigid(poses: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms `(..., 4, 4)` in closed form (transposed rotation, rotated negative translation)."""
    if poses.shape[-2:] != (4, 4):
        raise ValueError(
            f"Rigid transforms must be (..., 4, 4) matrices, got {tuple(poses.shape)}; complete a 3x4 [R | t] with "
            "the row [0, 0, 0, 1]."
        )
    rotation_t = poses[..., :3, :3].transpose(-1, -2)
    inverse = torch.zeros_like(poses)
    inverse[..., :3, :3] = rotation_t
    inverse[..., :3, 3] = -(rotation_t @ poses[..., :3, 3:]).squeeze(-1)
    inverse[..., 3, 3] = 1.0
    return inverse


def transform_points(poses: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply `(B, N, 4, 4)` transforms to `(B, N, H, W, 3)` point maps (view `n` by pose `n`)."""
    return torch.einsum("bnij,bnhwj->bnhwi", poses[..., :3, :3], points) + poses[..., None, None, :3, 3]
