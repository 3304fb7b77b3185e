"""COLMAP export (`g2vlm_hf.export.colmap`), read back with pycolmap (COLMAP's maintained Python bindings): the poses
COLMAP sees are the inverses of ours, the points, colours and cameras are ours, and every point projects through
COLMAP's camera model onto the pixel it was predicted for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g2vlm_hf.export import export_colmap, rotation_to_quaternion
from g2vlm_hf.modeling.intrinsics import estimate_intrinsics
from g2vlm_hf.training import render_room
from g2vlm_hf.training.synthetic import yaw_pose

pycolmap = pytest.importorskip("pycolmap", reason='COLMAP read-back needs pycolmap: pip install -e ".[test]"')

H, W, FOCAL = 18, 24, 21.0


def tilted_pose(x: float, z: float, yaw: float, pitch: float) -> np.ndarray:
    pose = yaw_pose(x, z, yaw)
    angle = np.radians(pitch)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    pose[:3, :3] = pose[:3, :3] @ tilt
    pose[1, 3] = -0.3
    return pose


@pytest.fixture(scope="module")
def room() -> dict[str, np.ndarray]:
    poses = np.stack(
        [tilted_pose(0.0, 0.0, 0.0, 0.0), tilted_pose(0.7, -0.4, 30.0, -10.0), tilted_pose(-0.5, 0.5, -150.0, 5.0)]
    )
    scene = render_room(poses, H, W, focal=FOCAL)
    local = np.einsum("nji,nhwj->nhwi", poses[:, :3, :3], scene.world_points - poses[:, None, None, :3, 3])
    confidence = np.random.default_rng(0).random((3, H, W)).astype(np.float32)
    return {
        "camera_poses": poses,
        "world_points": scene.world_points,
        "images": scene.images,
        "confidence": confidence,
        "intrinsics": estimate_intrinsics(torch.from_numpy(local)).numpy(),
    }


def test_quaternion_matches_colmaps_rotation():
    rng = np.random.default_rng(1)
    rotations = [np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0]), np.eye(3)]
    for _ in range(20):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rotations.append(q * np.sign(np.linalg.det(q)))
    for rotation in rotations:
        w, x, y, z = rotation_to_quaternion(rotation)
        colmap_rotation = pycolmap.Rotation3d(np.array([x, y, z, w])).matrix()  # pycolmap takes xyzw
        np.testing.assert_allclose(colmap_rotation, rotation, atol=1e-12)


def test_colmap_model_reads_back_with_pycolmap(room, tmp_path):
    written = export_colmap(tmp_path / "sparse", **room, confidence_percentile=25.0)
    names = sorted(p.relative_to(tmp_path / "sparse").as_posix() for p in written)
    assert names == [
        "cameras.txt",
        "images.txt",
        "images/view_000.png",
        "images/view_001.png",
        "images/view_002.png",
        "points3D.txt",
    ]

    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path / "sparse"))
    assert model.num_cameras() == 3 and model.num_images() == 3
    kept = room["confidence"] >= np.percentile(room["confidence"], 25.0)
    assert model.num_points3D() == kept.sum()

    for index in range(3):
        camera = model.cameras[index + 1]
        assert camera.model.name == "PINHOLE" and (camera.width, camera.height) == (W, H)
        np.testing.assert_allclose(camera.params, [FOCAL, FOCAL, W / 2, H / 2], atol=1e-5)
        image = model.images[index + 1]
        assert image.name == f"view_{index:03d}.png" and image.camera_id == index + 1
        # COLMAP stores world-to-camera; ours is camera-to-world
        cam_from_world = image.cam_from_world().matrix()
        np.testing.assert_allclose(cam_from_world, np.linalg.inv(room["camera_poses"][index])[:3], atol=1e-9)
        np.testing.assert_allclose(image.projection_center(), room["camera_poses"][index][:3, 3], atol=1e-9)

    expected_xyz = room["world_points"][kept]
    expected_rgb = room["images"][kept]
    order = sorted(model.points3D)
    xyz = np.array([model.points3D[i].xyz for i in order])
    rgb = np.array([model.points3D[i].color for i in order])
    np.testing.assert_allclose(xyz, expected_xyz, atol=1e-6)
    np.testing.assert_array_equal(rgb, expected_rgb)

    # each point projects, through COLMAP's camera and pose, onto its own pixel
    views, rows, columns = np.nonzero(kept)
    for k, point_id in enumerate(order):
        [element] = model.points3D[point_id].track.elements
        assert element.image_id == views[k] + 1
        image = model.images[element.image_id]
        observed = image.points2D[element.point2D_idx]
        assert observed.point3D_id == point_id
        np.testing.assert_allclose(observed.xy, [columns[k] + 0.5, rows[k] + 0.5])
        projected = image.project_point(model.points3D[point_id].xyz)
        np.testing.assert_allclose(projected, observed.xy, atol=1e-4)
        assert model.points3D[point_id].error < 1e-4
    assert model.compute_mean_reprojection_error() < 1e-4


def test_colmap_subsample_and_errors(room, tmp_path):
    export_colmap(tmp_path / "a", **room, max_points=100, write_images=False, image_names=["a.png", "b.png", "c.png"])
    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path / "a"))
    assert model.num_points3D() == 100 and not (tmp_path / "a" / "images").exists()
    assert sorted(image.name for image in model.images.values()) == ["a.png", "b.png", "c.png"]
    bad = dict(room, intrinsics=room["intrinsics"].copy())
    bad["intrinsics"][1, 0, 0] = np.nan  # view 1 has no usable camera: it and its points are left out
    bad["intrinsics"][2, 1, 1] = -3.0  # nor has view 2
    export_colmap(tmp_path / "partial", **bad)
    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path / "partial"))
    assert sorted(model.images) == [1] and sorted(model.cameras) == [1]
    assert model.num_points3D() == H * W
    assert sorted(p.name for p in (tmp_path / "partial" / "images").iterdir()) == ["view_000.png"]
    bad["intrinsics"][0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="usable pinhole camera"):
        export_colmap(tmp_path / "b", **bad)
    with pytest.raises(ValueError, match="filtered away"):
        export_colmap(tmp_path / "c", **dict(room, world_points=np.full_like(room["world_points"], np.nan)))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ("abc", "the single string 'abc'"),
        (["a.png", "../../escaped.png", "c.png"], r"not plain file names without spaces: \['../../escaped.png'\]"),
        (["a.png", "sub/b.png", "c.png"], r"not plain file names .*'sub/b.png'"),
        (["a.png", "..", "c.png"], r"not plain file names .*'\.\.'"),
        (["a.png", "b c.png", "c.png"], r"not plain file names .*'b c.png'"),
        (["a.png", "a.png", "c.png"], "3 new distinct names"),
        (["a.png", "b.png"], "3 new distinct names"),
        (["a.png", "b.jpg", "c.png"], r"\['b.jpg'\] do not end in .png"),
    ],
)
def test_colmap_image_names_stay_inside_images(room, tmp_path, names, message):
    """A name is a file in `images/`: nothing is written anywhere (least of all outside the output) when one is not."""
    output = tmp_path / "deep" / "down" / "sparse"
    with pytest.raises(ValueError, match=message):
        export_colmap(output, **room, image_names=names)
    assert list(tmp_path.rglob("*")) == []


def test_colmap_names_of_images_kept_elsewhere_may_be_jpegs(room, tmp_path):
    names = ["IMG_1.jpg", "IMG_2.JPG", "IMG_3.jpeg"]
    export_colmap(tmp_path / "sparse", **room, image_names=names, write_images=False)
    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path / "sparse"))
    assert sorted(image.name for image in model.images.values()) == names
