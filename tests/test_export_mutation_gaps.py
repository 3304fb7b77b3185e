"""Behaviour of the COLMAP export, the point filters and the coverage view choice that the other tests left unchecked
(found by mutation testing): quaternions of every kind of rotation, poses and cameras read back and re-projected with
unequal focal lengths, the ERROR column, cameras with a zero focal length, the documented defaults and bounds, and the
small counts of the coverage choice."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from transformers.utils import logging

from g2vlm_hf.export import compute_keep_mask, export_colmap, filter_points, rotation_to_quaternion
from g2vlm_hf.export.colmap import ColmapExportOptions
from g2vlm_hf.view_selection import choose_views, coverage_indices

pycolmap = pytest.importorskip("pycolmap", reason='COLMAP read-back needs pycolmap: pip install -e ".[test]"')

H, W = 6, 8
FX, FY, CX, CY = 30.0, 20.0, 4.5, 2.0


def axis_angle(axis, angle: float) -> np.ndarray:
    """Rodrigues' rotation about `axis` by `angle` (radians)."""
    n = np.asarray(axis, dtype=np.float64)
    n = n / np.linalg.norm(n)
    k = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def quaternion_matrix(w: float, x: float, y: float, z: float) -> np.ndarray:
    """The rotation of a unit Hamilton quaternion, written out by hand."""
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def cube_rotations() -> list[np.ndarray]:
    """The 24 rotations of a cube: signed permutation matrices of determinant +1 (exact quarter and half turns)."""
    out = []
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), permutation] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


def pose(axis, angle: float, centre) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = axis_angle(axis, angle)
    out[:3, 3] = centre
    return out


def pinhole_scene(poses: np.ndarray, intrinsics: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-pixel points that the pinhole `intrinsics` and camera-to-world `poses` see exactly at each pixel's centre."""
    rng = np.random.default_rng(seed)
    views = len(poses)
    rows, columns = np.mgrid[0:H, 0:W] + 0.5
    world = np.empty((views, H, W, 3))
    for index in range(views):
        (fx, _, cx), (_, fy, cy), _ = intrinsics[index]
        depth = rng.uniform(2.0, 5.0, (H, W))
        local = np.stack([(columns - cx) / fx, (rows - cy) / fy, np.ones((H, W))], axis=-1) * depth[..., None]
        world[index] = local @ poses[index, :3, :3].T + poses[index, :3, 3]
    return {
        "camera_poses": poses,
        "world_points": world,
        "images": rng.integers(0, 256, (views, H, W, 3), dtype=np.uint8),
        "intrinsics": intrinsics,
    }


def camera(fx=FX, fy=FY, cx=CX, cy=CY) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


POSES = np.stack(
    [
        pose((1, 2, 3), 0.4, (0.0, 0.0, 0.0)),
        pose((-2, 1, 0.5), 2.5, (1.0, -0.5, 2.0)),
        pose((0, 1, 1), math.pi, (-1.0, 1.0, 0.5)),
    ]
)


def read_points3d(folder) -> dict[int, tuple[np.ndarray, float, list[int]]]:
    """points3D.txt by hand: id -> (xyz, error, track)."""
    out = {}
    for line in (folder / "points3D.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        fields = line.split()
        out[int(fields[0])] = (np.array(fields[1:4], dtype=float), float(fields[7]), [int(f) for f in fields[8:]])
    return out


# ------------------------------------------------------------------------------------------------------- quaternions


def test_quaternion_of_rotations_about_any_axis_by_any_angle():
    """(w, x, y, z) = (cos a/2, sin a/2 n) for a turn by a < pi about n, whichever component is largest; half turns
    and the exact quarter/half turns of a cube come back as a quaternion of the same rotation with w >= 0."""
    rng = np.random.default_rng(3)
    axes = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 2, 3), (-2, 1, 0.5)]
    axes += [tuple(a) for a in rng.normal(size=(6, 3))]
    for axis in axes:
        n = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
        for angle in (0.3, 1.2, 2.0, 2.6):
            expected = np.concatenate([[np.cos(angle / 2)], np.sin(angle / 2) * n])
            np.testing.assert_allclose(rotation_to_quaternion(axis_angle(n, angle)), expected, atol=1e-12)
        half = rotation_to_quaternion(axis_angle(n, math.pi))
        assert abs(half[0]) < 1e-12 and abs(abs(half[1:] @ n) - 1.0) < 1e-12
    for rotation in cube_rotations():
        q = rotation_to_quaternion(rotation)
        assert q[0] >= 0 and abs(np.linalg.norm(q) - 1.0) < 1e-15
        np.testing.assert_allclose(quaternion_matrix(*q), rotation, atol=1e-15)


# ------------------------------------------------------------------------------------------------------ COLMAP model


def test_unequal_focal_lengths_and_centre_reproject_each_point_onto_its_pixel(tmp_path):
    """With fx != fy and cx != cy on a non-square view, cameras.txt holds `fx fy cx cy` in that order, images.txt the
    inverse pose, and each point goes, through the written quaternion, translation and camera, to its pixel centre."""
    intrinsics = np.stack([camera(), camera(fx=25.0, fy=35.0, cx=3.0, cy=3.5), camera(fx=18.0, fy=22.0)])
    scene = pinhole_scene(POSES, intrinsics)
    export_colmap(tmp_path, **scene, write_images=False)
    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path))
    for index in range(3):
        cam = model.cameras[index + 1]
        assert (cam.width, cam.height) == (W, H)
        (fx, _, cx), (_, fy, cy), _ = intrinsics[index]
        np.testing.assert_array_equal(cam.params, [fx, fy, cx, cy])
    for line in (tmp_path / "images.txt").read_text().splitlines()[4::2]:
        image_id, qw, qx, qy, qz, tx, ty, tz = (float(f) for f in line.split()[:8])
        rotation, centre = POSES[int(image_id) - 1, :3, :3], POSES[int(image_id) - 1, :3, 3]
        world_to_camera = quaternion_matrix(qw, qx, qy, qz)
        np.testing.assert_allclose(world_to_camera @ rotation, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(world_to_camera @ centre + [tx, ty, tz], 0.0, atol=1e-12)
    for point in model.points3D.values():
        [element] = point.track.elements
        image = model.images[element.image_id]
        (fx, _, cx), (_, fy, cy), _ = intrinsics[element.image_id - 1]
        x, y, z = image.cam_from_world().matrix() @ np.append(point.xyz, 1.0)
        np.testing.assert_allclose([fx * x / z + cx, fy * y / z + cy], image.points2D[element.point2D_idx].xy)
        assert point.error < 1e-9


def test_error_is_the_pixel_distance_of_the_projection_and_minus_one_when_it_has_none(tmp_path):
    """ERROR of points3D.txt: a point moved to project 3 pixels right and 4 down of its pixel centre has error 5; one at
    the camera centre (no projection) has COLMAP's 'unknown', -1."""
    intrinsics = np.stack([camera()] * 3)
    scene = pinhole_scene(POSES, intrinsics)
    row, column, depth = 2, 5, 3.0
    u, v = column + 0.5 + 3.0, row + 0.5 + 4.0
    local = depth * np.array([(u - CX) / FX, (v - CY) / FY, 1.0])
    scene["world_points"][1, row, column] = POSES[1, :3, :3] @ local + POSES[1, :3, 3]
    scene["world_points"][2, 0, 0] = POSES[2, :3, 3]
    export_colmap(tmp_path, **scene, write_images=False)
    errors = {}
    for xyz, error, track in read_points3d(tmp_path).values():
        errors[tuple(xyz)] = (error, track[0])
    moved = errors.pop(tuple(scene["world_points"][1, row, column]))
    assert moved[1] == 2 and abs(moved[0] - 5.0) < 1e-9
    assert errors.pop(tuple(scene["world_points"][2, 0, 0])) == (-1.0, 3)
    assert max(error for error, _ in errors.values()) < 1e-9


@pytest.mark.parametrize("focal", ["fx", "fy"])
def test_a_zero_focal_length_leaves_that_view_out(tmp_path, focal):
    """'a focal length <= 0' is unusable: a view with fx = 0 or fy = 0 has no camera, image or points in the model,
    and the others keep their view-numbered ids."""
    scene = pinhole_scene(POSES, np.stack([camera()] * 3))  # every point finite, view 1's included
    scene["intrinsics"][1, (0, 0) if focal == "fx" else (1, 1)] = 0.0
    export_colmap(tmp_path, **scene)
    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path))
    assert sorted(model.cameras) == sorted(model.images) == [1, 3]
    assert model.num_points3D() == 2 * H * W
    assert {point.track.elements[0].image_id for point in model.points3D.values()} == {1, 3}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["view_000.png", "view_002.png"]


def test_any_positive_focal_length_is_usable(tmp_path):
    """Only 'a focal length <= 0' is unusable: half a pixel is a (strange but) usable camera, written as given."""
    scene = pinhole_scene(POSES, np.stack([camera(fx=0.5, fy=0.25, cx=0.5, cy=0.5)] * 3))
    export_colmap(tmp_path, **scene, write_images=False)
    model = pycolmap.Reconstruction()
    model.read_text(str(tmp_path))
    assert sorted(model.images) == [1, 2, 3] and model.num_points3D() == 3 * H * W
    np.testing.assert_array_equal(model.cameras[2].params, [0.5, 0.25, 0.5, 0.5])


def test_views_left_out_are_named_in_a_warning_and_only_then(tmp_path, caplog):
    """The views without a usable camera are named in a warning; a model with every camera usable warns of none."""
    scene = pinhole_scene(POSES, np.stack([camera()] * 3))
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            export_colmap(tmp_path / "all", **scene, write_images=False)
            assert "no usable pinhole camera" not in caplog.text
            scene["intrinsics"][2, 0, 2] = np.inf
            export_colmap(tmp_path / "some", **scene, write_images=False)
    finally:
        logging.disable_propagation()
    assert "Views [2] have no usable pinhole camera" in caplog.text


def test_every_colmap_option_may_be_left_out():
    """The forwarded options are all optional for type checkers (`total=False`): `export_colmap(..., seed=1)` alone
    type-checks."""
    assert ColmapExportOptions.__required_keys__ == frozenset()


def test_colmap_subsample_seed_defaults_to_zero(tmp_path):
    """`seed` defaults to 0: the default subsample is the seed-0 one (and another seed draws another)."""
    scene = pinhole_scene(POSES, np.stack([camera()] * 3))
    for name, seed in (("default", None), ("zero", 0), ("one", 1)):
        options = {} if seed is None else {"seed": seed}
        export_colmap(tmp_path / name, **scene, max_points=10, write_images=False, **options)
    text = {name: (tmp_path / name / "points3D.txt").read_text() for name in ("default", "zero", "one")}
    assert text["default"] == text["zero"] != text["one"]


# ---------------------------------------------------------------------------------------------------- point filters


def test_percentile_bounds_are_accepted_and_mean_all_or_the_most_confident():
    """The percentile is in [0, 100], bounds included: 0 drops no point that has a confidence (not even -inf), 100
    keeps only the points of the largest confidence."""
    points = np.zeros((1, 2, 3, 3))
    confidence = np.array([[[0.5, -np.inf, 2.0], [np.nan, 2.0, 1.0]]])
    np.testing.assert_array_equal(
        compute_keep_mask(points, confidence, confidence_percentile=0.0), ~np.isnan(confidence)
    )
    np.testing.assert_array_equal(compute_keep_mask(points, confidence, confidence_percentile=100.0), confidence == 2.0)
    with pytest.raises(ValueError, match=r"`confidence_percentile` must be in \[0, 100\], got 100.5"):
        compute_keep_mask(points, confidence, confidence_percentile=100.5)


def test_a_small_positive_percentile_still_filters():
    """Any percentile above 0 filters: the 1st percentile of the confidences 0, 1, ..., 99 is 0.99 (linear
    interpolation at rank 0.01 * 99), so only the point of confidence 0 goes."""
    points = np.zeros((1, 10, 10, 3))
    confidence = np.arange(100.0)[::-1].reshape(1, 10, 10)
    keep = compute_keep_mask(points, confidence, confidence_percentile=1.0)
    np.testing.assert_array_equal(keep, confidence != 0.0)


def test_max_points_of_one_and_of_all_points():
    """`max_points=1` is allowed and keeps one point; `max_points` equal to (or above) the number of points keeps
    them all, in pixel order; a draw of all but one point repeats no point."""
    points = np.arange(24, dtype=np.float32).reshape(1, 2, 4, 3)
    colours = np.arange(24, dtype=np.uint8).reshape(1, 2, 4, 3)
    one, one_colour = filter_points(points, colours, max_points=1)
    assert one.shape == (1, 3) and one_colour.shape == (1, 3)
    assert one[0].tolist() in points.reshape(-1, 3).tolist()
    for cap in (8, 9):
        kept, _ = filter_points(points, colours, max_points=cap)
        np.testing.assert_array_equal(kept, points.reshape(-1, 3))
    for seed in range(5):
        kept, kept_colours = filter_points(points, colours, max_points=7, seed=seed)
        assert len({tuple(p) for p in kept.tolist()}) == 7
        np.testing.assert_array_equal(kept_colours, kept.astype(np.uint8))
        assert (np.diff(kept[:, 0]) > 0).all()  # in their original order


# ---------------------------------------------------------------------------------------------------- view choice


def places(centres) -> np.ndarray:
    poses = np.tile(np.eye(4), (len(centres), 1, 1))
    poses[:, :3, 3] = centres
    return poses


def test_coverage_of_one_view_and_of_none():
    """A count of 1 gives the first view with a usable camera; a count of 0 (or less) gives no view."""
    poses = places([(0, 0, 0), (1, 0, 0), (5, 0, 0)])
    poses[0, 0, 3] = np.nan
    assert coverage_indices(poses, 1) == [1]
    assert choose_views(poses, 1, "coverage") == [1]
    for count in (0, -1):
        assert coverage_indices(poses, count) == []
        assert choose_views(poses, count, "coverage") == []


@pytest.mark.parametrize(
    ("scale", "offset"), [(1.0, (0, 0, 0)), (1e-3, (0, 0, 0)), (1e3, (0, 0, 0)), (1.0, (100, -50, 30))]
)
def test_coverage_measures_places_in_median_spreads_whatever_the_units_and_origin(scale, offset):
    """Centres count in units of the median distance to the median centre, so scaling or moving the whole trajectory
    changes nothing. Walk x = 0..4 facing +z, plus one view at x = 2 facing -z: the median spread is 1, so the far end
    (4 units away) beats the turned view (sqrt(2^2 + 2^2) = 2.83 away) as the second choice."""
    poses = places([(x, 0, 0) for x in (0, 1, 2, 3, 4, 2)])
    poses[5, :3, :3] = np.diag([-1.0, 1.0, -1.0])  # a half turn about y: it looks along -z
    poses[:, :3, 3] = poses[:, :3, 3] * scale + np.asarray(offset, dtype=np.float64)
    assert coverage_indices(poses, 2) == [0, 4]
    assert coverage_indices(poses, 3) == [0, 4, 5]


def turned(yaw_degrees: float) -> np.ndarray:
    return axis_angle((0, 1, 0), np.radians(yaw_degrees))


def test_a_view_without_a_camera_does_not_end_the_choice_early():
    """Views 30 degrees apart at one place differ by 2 sin(15 deg) = 0.52 < 1 in the features: a view without a
    camera must never look farther than them, so both usable views are chosen."""
    poses = places([(0, 0, 0)] * 3)
    poses[1, :3, :3] = turned(30.0)
    poses[2, :3, 3] = np.nan
    assert coverage_indices(poses, 3) == [0, 1]


def test_choose_views_by_coverage_and_uniformly_differ_on_a_lingering_camera():
    """A camera that stays at one place for views 0-7 and 9 and visits x = 5 at view 8: two views by coverage are
    the first and the visit, evenly they are the first and the last. Most centres coincide, so the median spread is
    0: places are then counted in world units (no division by zero)."""
    poses = places([(0, 0, 0)] * 8 + [(5, 0, 0), (0, 0, 0)])
    assert choose_views(poses, 2, "coverage") == [0, 8]
    assert choose_views(poses, 2, "uniform") == [0, 9]


def test_one_view_by_coverage_without_any_camera_falls_back_to_the_middle_view():
    """No usable camera: coverage falls back to the even choice, for a count of 1 too (the middle view)."""
    poses = places([(k, 0, 0) for k in range(5)])
    poses[:, :3, 3] = np.nan
    assert choose_views(poses, 1, "coverage") == [2]


def test_a_view_without_a_camera_does_not_change_the_unit_of_places():
    """The walk of the units test, in steps of 10 cm, plus a view without a camera: the spread of the usable cameras
    is still 1 step, so the far end (4 steps) still beats the turned view (2.83) as the second choice (the NaN camera
    made the spread NaN, places were measured in metres and the turned view won)."""
    poses = places([(x, 0, 0) for x in (0, 1, 2, 3, 4, 2, 0)])
    poses[5, :3, :3] = np.diag([-1.0, 1.0, -1.0])
    poses[:, :3, 3] *= 0.1
    poses[6, :3, 3] = np.nan
    assert coverage_indices(poses, 2) == [0, 4]
