"""Rigid transforms: the closed-form inverse is the matrix inverse, and applying a pose maps camera points to world
points view by view."""

from __future__ import annotations

import pytest
import torch

from g2vlm_hf.modeling.rigid import invert_rigid, transform_points


def random_poses(*batch: int) -> torch.Tensor:
    """Camera-to-world matrices with random proper rotations (QR of a Gaussian, sign-fixed) and translations."""
    q, r = torch.linalg.qr(torch.randn(*batch, 3, 3, dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    rotation = rotation * torch.det(rotation)[..., None, None]  # det +1
    poses = torch.eye(4, dtype=torch.float64).repeat(*batch, 1, 1)
    poses[..., :3, :3] = rotation
    poses[..., :3, 3] = 3 * torch.randn(*batch, 3, dtype=torch.float64)
    return poses


def test_the_inverse_is_the_matrix_inverse_for_any_batch_shape():
    poses = random_poses(2, 5)
    torch.testing.assert_close(invert_rigid(poses), torch.linalg.inv(poses))
    torch.testing.assert_close(invert_rigid(poses) @ poses, torch.eye(4, dtype=torch.float64).expand(2, 5, 4, 4))
    torch.testing.assert_close(invert_rigid(poses[0, 0]), torch.linalg.inv(poses[0, 0]))


def test_applying_a_pose_maps_each_views_points_by_its_own_pose():
    poses = random_poses(2, 3)
    points = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    moved = transform_points(poses, points)
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    for b in range(2):
        for n in range(3):
            expected = (poses[b, n] @ homogeneous[b, n].reshape(-1, 4).T).T[:, :3].reshape(4, 5, 3)
            torch.testing.assert_close(moved[b, n], expected)
    torch.testing.assert_close(transform_points(invert_rigid(poses), moved), points)


def test_a_three_by_four_pose_is_refused_with_how_to_complete_it():
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 4\) matrices, got \(2, 3, 4\).*\[0, 0, 0, 1\]"):
        invert_rigid(random_poses(2)[:, :3])
