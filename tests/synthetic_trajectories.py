"""A stand-in for the network on synthetic trajectories with known geometry, for the chunked-reconstruction tests and
benchmarks (robust alignment, loop closure, streaming exports).

`LoopTrajectory` is the ground truth: cameras going once around a circle (so the last views see what the first saw)
looking at the scene around them, with per-pixel depths. `StandInModel.reconstruct` returns the truth of the views it
is asked for, as a model would predict it: in a fresh random similarity frame per call, with per-view noise, a share
of gross outliers among the world points, and drift (every step between consecutive views of one call is biased by a
small rotation and scale error, so the error of a call grows along its views, as in visual odometry). Its
`model.geometry_encoder` returns per-view "patch tokens" that describe the place a view sees (random Fourier features
of the camera's position and heading), so that retrieval by image features finds revisits.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature

from g2vlm_hf.modeling.outputs import G2VLMReconstructionOutput
from g2vlm_hf.similarity import Similarity, umeyama

HEIGHT, WIDTH, FOCAL = 6, 8, 6.0


def rotation_from_vector(vector: np.ndarray) -> np.ndarray:
    """Rotation matrix of an axis-angle vector (Rodrigues)."""
    angle = np.linalg.norm(vector)
    if angle == 0:
        return np.eye(3)
    x, y, z = vector / angle
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def random_similarity(rng: np.random.Generator) -> Similarity:
    rotation = torch.from_numpy(rotation_from_vector(rng.normal(size=3) * 2))
    return Similarity(float(rng.uniform(0.2, 5.0)), rotation, torch.from_numpy(rng.normal(0, 10, 3)))


class LoopTrajectory:
    """`num_views` cameras once around a circle of radius `radius` (view `num_views` would be view 0 again), each
    looking outwards and slightly ahead at the wall of a cylinder of radius `2.5 * radius`."""

    def __init__(self, num_views: int, radius: float = 4.0, seed: int = 0):
        start = np.random.default_rng(seed).uniform(0, 2 * np.pi)  # where on the circle the walk starts
        angles = start + 2 * np.pi * np.arange(num_views) / num_views
        positions = np.stack([radius * np.cos(angles), 0.2 * np.sin(3 * angles), radius * np.sin(angles)], axis=1)
        self.angles = angles
        # camera z (forward) points outwards and a little ahead; y (down) along the world's -y
        rotations = []
        for angle in angles:
            forward = np.array([np.cos(angle + 0.3), 0.0, np.sin(angle + 0.3)])
            down = np.array([0.0, -1.0, 0.0])
            right = np.cross(down, forward)
            rotations.append(np.stack([right, down, forward], axis=1))
        self.poses = torch.eye(4, dtype=torch.float64).repeat(num_views, 1, 1)
        self.poses[:, :3, :3] = torch.from_numpy(np.stack(rotations))
        self.poses[:, :3, 3] = torch.from_numpy(positions)
        rows, columns = torch.meshgrid(torch.arange(HEIGHT) + 0.5, torch.arange(WIDTH) + 0.5, indexing="ij")
        rays = torch.stack([(columns - WIDTH / 2) / FOCAL, (rows - HEIGHT / 2) / FOCAL, torch.ones_like(rows)], -1)
        # the scene is the inside of a cylinder around the circle (radius 2.5 x, vertical axis): where each pixel's ray
        # meets it is that pixel's depth, so views of one place see the same points
        directions = torch.einsum("nij,hwj->nhwi", self.poses[:, :3, :3], rays.double())
        origins = self.poses[:, None, None, :3, 3].expand_as(directions)
        a = directions[..., 0] ** 2 + directions[..., 2] ** 2
        b = 2 * (origins[..., 0] * directions[..., 0] + origins[..., 2] * directions[..., 2])
        c = origins[..., 0] ** 2 + origins[..., 2] ** 2 - (2.5 * radius) ** 2
        depth = (-b + (b * b - 4 * a * c).sqrt()) / (2 * a)
        self.local = rays.double() * depth[..., None]
        self.extent = 2 * radius

    @property
    def num_views(self) -> int:
        return self.poses.shape[0]


def world_from(poses: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nij,nhwj->nhwi", poses[:, :3, :3], local) + poses[:, None, None, :3, 3]


class PlaceEncoder(nn.Module):
    """Stands in for the geometry encoder: `(views, 4, 64)` "patch tokens" of the place each view sees."""

    def __init__(self, trajectory: LoopTrajectory, seed: int = 0, noise: float = 0.05):
        super().__init__()
        rng = np.random.default_rng(seed)
        centres = trajectory.poses[:, :3, 3] + 3.0 * trajectory.poses[:, :3, 2]  # a point the view looks at
        frequencies = torch.from_numpy(rng.normal(0, 1.0 / trajectory.extent * 4, (3, 32)))
        phases = torch.from_numpy(rng.uniform(0, 2 * np.pi, 32))
        projected = centres @ frequencies + phases
        features = torch.cat([projected.cos(), projected.sin()], dim=1)
        tokens = features[:, None].repeat(1, 4, 1) + torch.from_numpy(rng.normal(0, noise, (len(features), 4, 64)))
        self.register_buffer("tokens", tokens.float())

    def forward(self, pixel_values: torch.Tensor, views_per_scene: int | None = None) -> torch.Tensor:
        return self.tokens[pixel_values[:, 0, 0, 0].long()]


class StandInModel(nn.Module):
    """`reconstruct` returns the truth of the requested views (see the module docstring).

    Args:
        noise: Per-view noise: camera positions `noise * extent` (per axis), rotations `noise` rad, depths `noise`
            relative.
        outlier_share: Share of world points thrown off, by a Gaussian offset of `outlier_spread` x the frame's
            scale per axis (50: far off, outside the scene; 5: inside it, as wrong depths are).
        drift_rotation: Rotation bias (rad, about the vertical) of each step between consecutive views of one call.
        drift_scale: Relative scale bias of each step.
        global_points: Also return `global_points`: the world points in a frame of their own per call (a random
            similarity of the call's world frame), as the global head predicts them.
    """

    def __init__(self, trajectory: LoopTrajectory, noise: float = 0.0, outlier_share: float = 0.0,
                 drift_rotation: float = 0.0, drift_scale: float = 0.0, seed: int = 1, outlier_spread: float = 50.0,
                 global_points: bool = False):  # fmt: skip
        super().__init__()
        self.trajectory, self.rng = trajectory, np.random.default_rng(seed)
        self.noise, self.outlier_share, self.outlier_spread = noise, outlier_share, outlier_spread
        self.global_points = global_points
        self.bias = Similarity(1.0 + drift_scale, torch.from_numpy(rotation_from_vector(np.array([0, drift_rotation, 0]))),
                               torch.zeros(3, dtype=torch.float64))  # fmt: skip
        self.model = nn.Module()
        self.model.geometry_encoder = PlaceEncoder(trajectory)
        self.calls: list[list[int]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def drifted(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera-to-world similarities of the views `index` chained with a biased step between neighbours: `(n,)`
        scales and `(n, 4, 4)` poses (rotation and position)."""
        truth = self.trajectory.poses[index]
        scales, poses = [1.0], [truth[0].clone()]
        for previous, current in itertools.pairwise(truth):
            step = torch.linalg.solve(previous, current)  # previous camera -> current camera (rigid)
            last = Similarity(scales[-1], poses[-1][:3, :3], poses[-1][:3, 3])
            moved = last.compose(self.bias).compose(Similarity(1.0, step[:3, :3], step[:3, 3]))
            pose = torch.eye(4, dtype=torch.float64)
            pose[:3, :3], pose[:3, 3] = moved.rotation, moved.translation
            scales.append(moved.scale)
            poses.append(pose)
        return torch.tensor(scales, dtype=torch.float64), torch.stack(poses)

    def reconstruct(self, geometry_pixel_values: torch.Tensor, **kwargs) -> G2VLMReconstructionOutput:
        self.model.geometry_encoder(geometry_pixel_values.flatten(0, 1))  # as the real model does (hooks see it)
        index = geometry_pixel_values[0, :, 0, 0, 0].long()
        self.calls.append(index.tolist())
        count, extent = len(index), self.trajectory.extent
        scales, poses = self.drifted(index)
        local = self.trajectory.local[index] * scales[:, None, None, None]
        noise = np.stack([rotation_from_vector(v) for v in self.rng.normal(0, self.noise, (count, 3))])
        poses[:, :3, :3] = torch.from_numpy(noise) @ poses[:, :3, :3]
        poses[:, :3, 3] += torch.from_numpy(self.rng.normal(0, self.noise * extent, (count, 3)))
        local = local * (1 + torch.from_numpy(self.rng.normal(0, self.noise, local.shape[:-1])))[..., None]
        frame = random_similarity(self.rng)
        local = local * frame.scale
        poses = frame.apply_to_poses(poses)
        world = world_from(poses, local)
        outliers = torch.from_numpy(self.rng.random(world.shape[:-1]) < self.outlier_share)
        world[outliers] += torch.from_numpy(
            self.rng.normal(0, self.outlier_spread * frame.scale, (int(outliers.sum()), 3))
        )
        fields = dict(camera_poses=poses, local_points=local, world_points=world, depth=local[..., 2],
                      intrinsics=torch.tensor([[FOCAL, 0, WIDTH / 2], [0, FOCAL, HEIGHT / 2], [0, 0, 1]]).repeat(count, 1, 1))  # fmt: skip
        if self.global_points:
            fields["global_points"] = random_similarity(self.rng).apply(world)
        return G2VLMReconstructionOutput(**{name: value.float()[None] for name, value in fields.items()})


def index_processor(geometry_images, return_tensors="pt", **kwargs):
    """Stands in for the processor: the view indices ride in the pixels."""
    pixels = torch.zeros(1, len(geometry_images), 3, 1, 1)
    pixels[0, :, 0, 0, 0] = torch.tensor(list(geometry_images), dtype=torch.float32)
    return BatchFeature({"geometry_pixel_values": pixels})


def trajectory_error(poses: torch.Tensor, truth: torch.Tensor) -> float:
    """ATE: RMSE of the camera positions after the one similarity that best maps them onto the truth."""
    scale, rotation, translation = umeyama(poses[:, :3, 3], truth[:, :3, 3])
    moved = Similarity(scale, rotation, translation).apply(poses[:, :3, 3].double())
    return float((moved - truth[:, :3, 3]).square().sum(1).mean().sqrt())


def relative_ate(poses: torch.Tensor, trajectory: LoopTrajectory) -> float:
    """[`trajectory_error`] as a share of the trajectory's extent."""
    return trajectory_error(poses, trajectory.poses) / trajectory.extent


__all__ = ["LoopTrajectory", "StandInModel", "index_processor", "relative_ate", "trajectory_error"]
