"""A tiny synthetic scene with exact geometry: a textured box room seen by pinhole cameras, rendered by ray casting.

It gives multi-view images with their true world points, valid masks and camera poses (camera-to-world, OpenCV axes:
x right, y down, z forward), and spatial questions whose answers follow from the geometry — enough for fine-tuning
smoke tests and examples to have a right answer to move toward.
"""

from dataclasses import dataclass

import numpy as np

from ..integers import is_integer

# The room: axis-aligned planes (axis, coordinate, RGB colour); cameras sit inside looking along +z.
ROOM_PLANES = (
    (0, -2.0, (200, 60, 60)),  # left wall, red
    (0, 2.0, (60, 60, 200)),  # right wall, blue
    (1, 1.0, (120, 120, 120)),  # floor (y points down)
    (1, -1.5, (230, 230, 230)),  # ceiling
    (2, 4.0, (60, 180, 60)),  # back wall, green
    (2, -4.0, (180, 160, 60)),  # wall behind the cameras
)


@dataclass
class SyntheticScene:
    """Views of the room. `images` `(N, H, W, 3)` uint8, `world_points` `(N, H, W, 3)`, `valid_mask` `(N, H, W)`,
    `camera_poses` `(N, 4, 4)` camera-to-world."""

    images: np.ndarray
    world_points: np.ndarray
    valid_mask: np.ndarray
    camera_poses: np.ndarray


def yaw_pose(x: float, z: float, yaw_degrees: float) -> np.ndarray:
    """Camera-to-world pose of a camera at (x, 0, z) turned by `yaw_degrees` about the vertical (y) axis."""
    angle = np.radians(yaw_degrees)
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]]
    pose[:3, 3] = [x, 0.0, z]
    return pose


def render_room(camera_poses: np.ndarray, height: int, width: int, focal: float | None = None) -> SyntheticScene:
    """Ray-cast the room from each camera (pinhole, principal point at the image centre).

    Args:
        camera_poses: `(views, 4, 4)` camera-to-world matrices (OpenCV camera frame), e.g. from [`yaw_pose`].
        height, width: Image size in pixels.
        focal: Focal length in pixels (defaults to 0.9 x width).
    """
    camera_poses = np.asarray(camera_poses)
    if camera_poses.ndim != 3 or camera_poses.shape[1:] != (4, 4) or len(camera_poses) == 0:
        raise ValueError(
            f"camera_poses must be (views, 4, 4) camera-to-world matrices, got shape {camera_poses.shape}; for one "
            "camera pass `pose[None]`."
        )
    if not (is_integer(height) and is_integer(width) and height > 0 and width > 0):
        raise ValueError(f"height and width must be positive integers, got {height!r} and {width!r}.")
    focal = focal or 0.9 * width
    rows, columns = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    rays_camera = np.stack([(columns - width / 2) / focal, (rows - height / 2) / focal, np.ones_like(rows)], -1)
    images, points, masks = [], [], []
    for pose in camera_poses:
        origin, rays = pose[:3, 3], rays_camera @ pose[:3, :3].T
        best = np.full((height, width), np.inf)
        colour = np.zeros((height, width, 3))
        hit = np.zeros((height, width, 3))
        for axis, coordinate, rgb in ROOM_PLANES:
            with np.errstate(divide="ignore", invalid="ignore"):
                distance = (coordinate - origin[axis]) / rays[..., axis]
            closer = (distance > 1e-6) & (distance < best)
            best = np.where(closer, distance, best)
            spot = origin + distance[..., None] * rays
            # checkerboard texture so that views are distinguishable
            other = [a for a in range(3) if a != axis]
            checker = (np.floor(spot[..., other[0]] * 2) + np.floor(spot[..., other[1]] * 2)) % 2
            shade = np.array(rgb) * (0.65 + 0.35 * checker[..., None])
            colour = np.where(closer[..., None], shade, colour)
            hit = np.where(closer[..., None], spot, hit)
        images.append(np.clip(colour, 0, 255).astype(np.uint8))
        points.append(hit.astype(np.float32))
        masks.append(np.isfinite(best))
    return SyntheticScene(np.stack(images), np.stack(points), np.stack(masks), camera_poses.astype(np.float32))


def spatial_questions(scene: SyntheticScene) -> list[tuple[str, str]]:
    """Question/answer pairs whose answers follow from the scene's camera geometry."""
    positions = scene.camera_poses[:, :3, 3]
    pairs = []
    for index in range(1, len(positions)):
        dx = positions[index, 0] - positions[0, 0]
        side = "right" if dx > 0 else "left"
        distance = float(np.linalg.norm(positions[index] - positions[0]))
        pairs.append((f"Did the camera move left or right between view 1 and view {index + 1}?", side))
        pairs.append((f"How far did the camera move between view 1 and view {index + 1}?", f"{distance:.1f} meters"))
    return pairs
