"""Tests of `g2vlm_hf.export`: writing a reconstruction as PLY, GLB, JSON and 16-bit depth PNGs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from g2vlm_hf import export
from g2vlm_hf.export import (
    atomic,
    compute_keep_mask,
    export_reconstruction,
    filter_points,
    load_depth_png16,
    save_cameras_json,
    save_depth_png16,
    save_point_cloud_ply,
    save_scene_glb,
    validation,
)
from g2vlm_hf.export import scene as scene_module

trimesh = pytest.importorskip("trimesh")

N, H, W = 3, 6, 8
PLANE_Z = 5.0


def _rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def make_scene(views: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Pinhole cameras (OpenCV frame) looking at the plane z = 5; world_points = R @ local + t exactly."""
    rng = np.random.default_rng(seed)
    focal = 6.0
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    rays = np.stack([(u - W / 2) / focal, (v - H / 2) / focal, np.ones_like(u)], axis=-1)  # (H, W, 3), z = 1
    poses, points, depths = [], [], []
    for index in range(views):
        pose = np.eye(4)
        pose[:3, :3] = _rotation_y(0.15 * (index - 1))
        pose[:3, 3] = [0.4 * index, -0.1 * index, 0.2 * index]
        world_rays = rays @ pose[:3, :3].T
        scale = (PLANE_Z - pose[2, 3]) / world_rays[..., 2]  # depth, since the ray's local z is 1
        local = rays * scale[..., None]
        poses.append(pose)
        points.append(local @ pose[:3, :3].T + pose[:3, 3])
        depths.append(local[..., 2])
    return {
        "camera_poses": np.stack(poses).astype(np.float32),
        "world_points": np.stack(points).astype(np.float32),
        "depth": np.stack(depths).astype(np.float32),
        "confidence": rng.permutation(views * H * W).reshape(views, H, W).astype(np.float32) + 1.0,
        "images": rng.integers(0, 256, size=(views, H, W, 3), dtype=np.uint8),
    }


@pytest.fixture
def scene() -> dict[str, np.ndarray]:
    return make_scene()


def test_exported_depth_and_cameras_back_project_to_the_exported_points(scene, tmp_path):
    # the files of one export agree with each other: each view's depth PNG, seen through its intrinsics and pose
    # from cameras.json, lands on that view's points in points.ply, which lie on the fixture's plane z = PLANE_Z
    intrinsics = np.tile(np.array([[6.0, 0.0, W / 2], [0.0, 6.0, H / 2], [0.0, 0.0, 1.0]]), (N, 1, 1))
    export_reconstruction(tmp_path, **scene, intrinsics=intrinsics)
    cameras = json.loads((tmp_path / "cameras.json").read_text())["cameras"]
    points = np.asarray(trimesh.load(tmp_path / "points.ply").vertices).reshape(N, H, W, 3)
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    for index, camera in enumerate(cameras):
        depth = load_depth_png16(tmp_path / "depth" / f"view_{index:03d}.png")
        (fx, _, cx), (_, fy, cy), _ = camera["intrinsics"]
        local = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1) * depth[..., None]
        pose = np.array(camera["camera_to_world"])
        np.testing.assert_allclose(local @ pose[:3, :3].T + pose[:3, 3], points[index], atol=1e-3)
    np.testing.assert_allclose(points[..., 2], PLANE_Z, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------- filtering


def test_filter_keeps_all_finite_points_in_pixel_order(scene):
    points, colours = filter_points(scene["world_points"], scene["images"])
    assert points.dtype == np.float32 and colours.dtype == np.uint8
    np.testing.assert_array_equal(points, scene["world_points"].reshape(-1, 3))
    np.testing.assert_array_equal(colours, scene["images"].reshape(-1, 3))


def test_filter_drops_nan_and_inf_points(scene):
    world = scene["world_points"].copy()
    world[0, 0, 0, 0] = np.nan
    world[1, 2, 3, 2] = np.inf
    world[2, 5, 7, 1] = -np.inf
    points, colours = filter_points(world, scene["images"])
    assert points.shape == (N * H * W - 3, 3) and colours.shape == (N * H * W - 3, 3)
    assert np.isfinite(points).all()
    mask = compute_keep_mask(world)
    assert mask.shape == (N, H, W) and mask.sum() == N * H * W - 3
    assert not mask[0, 0, 0] and not mask[1, 2, 3] and not mask[2, 5, 7]
    np.testing.assert_array_equal(colours, scene["images"][mask])


@pytest.mark.parametrize("percentile", [20.0, 50.0, 90.0])
def test_confidence_percentile_keeps_expected_fraction(scene, percentile):
    total = N * H * W
    points, _ = filter_points(
        scene["world_points"], scene["images"], scene["confidence"], confidence_percentile=percentile
    )
    expected = total * (1 - percentile / 100)
    assert abs(points.shape[0] - expected) <= 1
    # The kept points are exactly the most confident ones.
    mask = compute_keep_mask(scene["world_points"], scene["confidence"], confidence_percentile=percentile)
    assert scene["confidence"][mask].min() > scene["confidence"][~mask].max()


def test_infinite_confidence_is_the_most_confident(scene):
    """An overflowed exp (the expp1 activation) gives +inf: those points are kept by any percentile, a -inf one goes
    with the least confident, and the threshold stays a number (numpy interpolates NaN next to an infinity)."""
    confidence = scene["confidence"].astype(np.float32)
    confidence[0, 0, :3] = np.inf
    confidence[1, 0, 0] = -np.inf
    for percentile in (0.0, 50.0, 99.9):
        mask = compute_keep_mask(scene["world_points"], confidence, confidence_percentile=percentile)
        assert mask[0, 0, :3].all() and mask[1, 0, 0] == (percentile == 0.0)
        finite = np.isfinite(confidence)
        assert abs(mask[finite].sum() - finite.sum() * (1 - percentile / 100)) <= 3


def test_points_beyond_float32_are_refused_not_written_as_inf(scene):
    world = scene["world_points"].astype(np.float64)
    world[0, 0, 0] = (1e39, 0.0, 0.0)  # finite in float64, inf once written as float32
    with pytest.raises(ValueError, match="beyond the float32 range"):
        filter_points(world, scene["images"])


def test_confidence_percentile_ignored_without_confidence(scene, caplog):
    """Every finite point is kept, and the ignored argument is said once, not by each writer the scene goes through
    (the command line writes its files, then its COLMAP model, from one reconstruction)."""
    transformers_logging.warning_once.cache_clear()
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            for _ in range(2):
                points, _ = filter_points(scene["world_points"], scene["images"], None, confidence_percentile=50.0)
    finally:
        transformers_logging.disable_propagation()
    assert points.shape[0] == N * H * W
    assert caplog.text.count("`confidence_percentile` is ignored: this reconstruction has no confidence") == 1


def test_max_points_subsample_is_seeded_subset(scene):
    full, _ = filter_points(scene["world_points"], scene["images"])
    first, colours = filter_points(scene["world_points"], scene["images"], max_points=50, seed=3)
    again, _ = filter_points(scene["world_points"], scene["images"], max_points=50, seed=3)
    other, _ = filter_points(scene["world_points"], scene["images"], max_points=50, seed=4)
    assert first.shape == (50, 3) and colours.shape == (50, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert {tuple(p) for p in first} <= {tuple(p) for p in full}


def test_filter_accepts_torch_tensors(scene):
    points, colours = filter_points(
        torch.from_numpy(scene["world_points"]).to(torch.bfloat16),
        torch.from_numpy(scene["images"]),
        torch.from_numpy(scene["confidence"]),
        confidence_percentile=50.0,
    )
    assert points.dtype == np.float32 and points.shape == (N * H * W // 2, 3)
    assert colours.dtype == np.uint8


# --------------------------------------------------------------------------------------------------------- file formats


def test_ply_round_trip(scene, tmp_path):
    points, colours = filter_points(scene["world_points"], scene["images"])
    path = save_point_cloud_ply(tmp_path / "cloud.ply", points, colours)
    assert path == tmp_path / "cloud.ply"
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian")
    loaded = trimesh.load(path)
    assert isinstance(loaded, trimesh.PointCloud)
    np.testing.assert_array_equal(np.asarray(loaded.vertices, dtype=np.float32), points)
    np.testing.assert_array_equal(np.asarray(loaded.colors)[:, :3], colours)
    assert os.listdir(tmp_path) == ["cloud.ply"]


def test_glb_round_trip(scene, tmp_path):
    points, colours = filter_points(scene["world_points"], scene["images"], max_points=100)
    path = save_scene_glb(tmp_path / "scene.glb", points, colours, scene["camera_poses"], image_size=(H, W))
    loaded = trimesh.load(path)
    assert isinstance(loaded, trimesh.Scene)

    clouds = [g for g in loaded.geometry.values() if isinstance(g, trimesh.PointCloud)]
    assert len(clouds) == 1
    np.testing.assert_allclose(np.asarray(clouds[0].vertices), points, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(clouds[0].colors)[:, :3], colours)

    cameras = sorted(name for name in loaded.graph.nodes_geometry if name.startswith("camera_"))
    assert cameras == [f"camera_{i}" for i in range(N)]
    expected_depth = export.DEFAULT_FRUSTUM_SCALE * export.robust_scene_scale(points, scene["camera_poses"])
    for index, name in enumerate(cameras):
        transform, geometry_name = loaded.graph[name]
        np.testing.assert_allclose(transform, scene["camera_poses"][index], atol=1e-6)
        frustum = loaded.geometry[geometry_name]
        # triangles (every viewer draws them), in the view's own colour
        assert isinstance(frustum, trimesh.Trimesh) and len(frustum.faces) == 8 * 8
        np.testing.assert_array_equal(
            np.unique(frustum.visual.vertex_colors[:, :3], axis=0), export.view_colours(N)[index : index + 1]
        )
        # Apex at the camera centre, base in front of the camera (+z) at the robust scale, views' aspect ratio
        local = np.asarray(frustum.vertices)
        tube = 0.04 * expected_depth
        assert np.linalg.norm(local, axis=1).min() <= tube
        np.testing.assert_allclose(local[:, 2].max(), expected_depth, rtol=0, atol=tube)
        np.testing.assert_allclose(np.ptp(local[:, 0]) / np.ptp(local[:, 1]), W / H, rtol=0.1)


def test_robust_scale_is_the_median_over_cameras_of_the_median_point_distance():
    """Points at known distances from known cameras: 60% at 3, 20% at 1 and 20% at 100 from the origin, seen by two
    cameras at the origin (median distance 3) and one 1,000 away (median about 1,000); rotations do not matter."""
    directions = np.random.default_rng(0).normal(size=(1000, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = np.repeat([3.0, 1.0, 100.0], [600, 200, 200])
    points = (directions * radii[:, None]).astype(np.float32)
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[1, :3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    poses[2, :3, 3] = [1000.0, 0.0, 0.0]
    assert export.robust_scene_scale(points, poses) == pytest.approx(3.0, rel=1e-6)
    poses[1, :3, 3] = [0.0, 1000.0, 0.0]  # now most cameras are far: the median follows them
    assert export.robust_scene_scale(points, poses) > 900.0


def test_frustums_follow_the_robust_scale_not_the_outliers(scene, tmp_path):
    """2% of far outliers set the bounding box; the frustums must stay sized by the bulk of the scene."""
    points, _ = filter_points(scene["world_points"], scene["images"])
    scale = export.robust_scene_scale(points, scene["camera_poses"])
    outliers = np.tile([[400.0, -300.0, 900.0]], (max(1, len(points) // 50), 1)).astype(np.float32)
    noisy = np.concatenate([points, outliers])
    assert np.isclose(export.robust_scene_scale(noisy, scene["camera_poses"]), scale, rtol=0.1)
    path = save_scene_glb(
        tmp_path / "s.glb", noisy, np.zeros((len(noisy), 3), np.uint8), scene["camera_poses"], image_size=(H, W)
    )
    frustum = trimesh.load(path).geometry["camera_0"]
    assert np.asarray(frustum.vertices)[:, 2].max() < 0.2 * scale


def test_glb_export_needs_no_scipy(scene, tmp_path, monkeypatch):
    """A fresh install has no scipy; trimesh's path code (`load_path`) would need it. The frustums must not."""
    monkeypatch.setitem(sys.modules, "scipy", None)
    for name in [m for m in sys.modules if m.startswith("scipy.")]:
        monkeypatch.setitem(sys.modules, name, None)
    points, colours = filter_points(scene["world_points"], scene["images"])
    save_scene_glb(tmp_path / "scene.glb", points, colours, scene["camera_poses"], image_size=(H, W))
    assert (tmp_path / "scene.glb").stat().st_size > 0


def test_view_colours_are_distinct():
    palette = export.view_colours(12)
    assert palette.shape == (12, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 12


def test_cameras_json_round_trip(scene, tmp_path):
    path = save_cameras_json(tmp_path / "cameras.json", torch.from_numpy(scene["camera_poses"]), (H, W))
    document = json.loads(path.read_text())
    cameras = document["cameras"]
    assert [c["index"] for c in cameras] == list(range(N))
    assert all(c["width"] == W and c["height"] == H for c in cameras)
    np.testing.assert_allclose(np.array([c["camera_to_world"] for c in cameras]), scene["camera_poses"], atol=0)
    assert "intrinsics" not in cameras[0]


def test_cameras_json_intrinsics_and_original_size(scene, tmp_path):
    intrinsics = np.tile(np.array([[6.0, 0.0, W / 2], [0.0, 6.0, H / 2], [0.0, 0.0, 1.0]]), (N, 1, 1))
    intrinsics[2, 0, 0] = np.nan  # a view that could not be fitted
    sizes = [(H * 10, W * 20)] * N
    path = save_cameras_json(tmp_path / "cameras.json", scene["camera_poses"], (H, W), intrinsics, sizes)
    cameras = json.loads(path.read_text())["cameras"]
    assert cameras[0]["intrinsics"] == [[6.0, 0.0, W / 2], [0.0, 6.0, H / 2], [0.0, 0.0, 1.0]]
    assert cameras[2]["intrinsics"][0][0] is None
    assert cameras[1]["original"] == {
        "height": H * 10,
        "width": W * 20,
        "intrinsics": [[120.0, 0.0, W * 10.0], [0.0, 60.0, H * 5.0], [0.0, 0.0, 1.0]],
    }
    with pytest.raises(ValueError, match="intrinsics"):
        save_cameras_json(tmp_path / "c.json", scene["camera_poses"], (H, W), intrinsics[:2])


def test_cameras_json_names_each_view(scene, tmp_path):
    """`view_names` (the files the views came from) are each camera's `name`, in view order; a bad list is refused
    before anything is written."""
    names = [f"photo_{index}.jpg" for index in reversed(range(N))]
    path = save_cameras_json(tmp_path / "cameras.json", scene["camera_poses"], (H, W), view_names=names)
    cameras = json.loads(path.read_text())["cameras"]
    assert [(camera["index"], camera["name"]) for camera in cameras] == list(enumerate(names))
    for bad, message in ((names[:-1], f"has {N - 1} names for {N} views"), ("photo.jpg", "a list of"),
                         ([1] * N, "strings")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            save_cameras_json(tmp_path / "bad.json", scene["camera_poses"], (H, W), view_names=bad)
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize(
    ("original_size", "warns"),
    [((480, 640), False), ((640, 480), True), ((3024, 4032), False), ((4032, 3024), True), ((500, 500), False)],
)
def test_original_sizes_that_look_swapped_warn(scene, tmp_path, original_size, warns):
    """Views of 392x518 from 640x480 photos: `(640, 480)` (PIL's `size`) would write wrong original intrinsics."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    poses = scene["camera_poses"]
    with CaptureLogger(logging.get_logger("g2vlm_hf.export.validation")) as captured:
        path = save_cameras_json(tmp_path / "cameras.json", poses, (392, 518), original_sizes=[original_size] * N)
    assert ("have the shape of the 392x518 views only once swapped" in captured.out) == warns, captured.out
    assert json.loads(path.read_text())["cameras"][0]["original"]["height"] == original_size[0]


def test_views_squashed_to_the_first_ones_shape_do_not_warn(scene, tmp_path):
    """`resize_views_to_first` (`--resize-views`): portrait photos after a landscape first one have the views' shape
    only once swapped, rightly; the first view, resized keeping its aspect, tells a swap from a squash."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    poses, logger = scene["camera_poses"], logging.get_logger("g2vlm_hf.export.validation")
    mixed = [(480, 640), (640, 480)] + [(480, 640)] * (N - 2)
    with CaptureLogger(logger) as squashed:
        save_cameras_json(tmp_path / "a.json", poses, (392, 518), original_sizes=mixed)
    with CaptureLogger(logger) as swapped:
        save_cameras_json(tmp_path / "b.json", poses, (392, 518), original_sizes=[s[::-1] for s in mixed])
    assert squashed.out == "" and "view(s) [0, 2" in swapped.out


def test_depth_png16_round_trip(scene, tmp_path):
    depth = scene["depth"][2].astype(np.float64)  # view 2 is tilted, so its depth varies
    depth[0, 0], depth[1, 1], depth[2, 2] = np.nan, np.inf, -1.0
    depth_range = save_depth_png16(tmp_path / "d.png", depth)
    valid = np.isfinite(depth) & (depth > 0)
    assert depth_range == (depth[valid].min(), depth[valid].max())

    with Image.open(tmp_path / "d.png") as image:
        assert image.mode == "I;16" and image.size == (W, H)
        codes = np.array(image)
        assert float(image.text["depth_min"]) == depth_range[0]
    assert codes[~valid].tolist() == [0, 0, 0]
    assert codes[valid].min() == 1 and codes[valid].max() == 65535

    decoded = load_depth_png16(tmp_path / "d.png")
    step = (depth_range[1] - depth_range[0]) / 65534
    assert np.isnan(decoded[~valid]).all()
    assert np.abs(decoded[valid] - depth[valid]).max() <= step / 2 + 1e-12


def test_depth_preview_orders_colours_by_depth(tmp_path):
    depth = np.tile(np.linspace(1.0, 10.0, 50), (4, 1))
    depth[0, 0] = np.nan
    depth[1, 1] = 1e6  # a far outlier does not wash the map out: the percentiles clip it
    image = export.colourise_depth(depth)
    assert image.shape == (4, 50, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [0, 0, 0]
    brightness = image[2].astype(float).sum(axis=1)
    assert (np.diff(brightness) <= 1e-9).all() and brightness[0] - brightness[-1] > 300  # near light, far dark
    assert len({tuple(c) for c in image[2]}) > 30  # many distinct colours along the ramp
    np.testing.assert_array_equal(image[2, 1:], image[3, 1:])
    assert export.colourise_depth(np.full((3, 3), np.nan)).max() == 0
    path = export.save_depth_preview(tmp_path / "p.png", depth)
    with Image.open(path) as saved:
        np.testing.assert_array_equal(np.array(saved), image)


def test_export_colours_points_by_view(scene, tmp_path):
    out = tmp_path / "out"
    export_reconstruction(out, **scene, point_colouring="view")
    cloud = trimesh.load(out / "points.ply")
    expected = np.repeat(export.view_colours(N), H * W, axis=0)
    np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], expected)
    with pytest.raises(ValueError, match="point_colouring"):
        export_reconstruction(tmp_path / "bad", **scene, point_colouring="depth")


def test_depth_png16_constant_and_empty(tmp_path):
    assert save_depth_png16(tmp_path / "c.png", np.full((4, 5), 2.5)) == (2.5, 2.5)
    np.testing.assert_array_equal(load_depth_png16(tmp_path / "c.png"), np.full((4, 5), 2.5))
    assert save_depth_png16(tmp_path / "e.png", np.full((4, 5), np.nan)) is None
    assert np.isnan(load_depth_png16(tmp_path / "e.png")).all()


# ------------------------------------------------------------------------------------------------------------ export


def test_export_reconstruction_writes_every_file(scene, tmp_path):
    out = tmp_path / "out"
    inputs = {key: torch.from_numpy(value) for key, value in scene.items()}
    written = export_reconstruction(out, **inputs, confidence_percentile=20.0)
    names = [p.relative_to(out).as_posix() for p in written]
    depth_maps = [f"depth/view_{i:03d}.png" for i in range(N)]
    previews = [f"depth/view_{i:03d}_preview.png" for i in range(N)]
    assert names == ["scene.glb", "points.ply", "cameras.json", *depth_maps, *previews]
    assert sorted(os.listdir(out)) == ["cameras.json", "depth", "points.ply", "scene.glb"]
    assert sorted(os.listdir(out / "depth")) == sorted(Path(name).name for name in depth_maps + previews)
    for index in range(N):
        with Image.open(out / previews[index]) as image:
            assert image.mode == "RGB" and image.size == (W, H)
            np.testing.assert_array_equal(np.array(image), export.colourise_depth(scene["depth"][index]))

    cloud = trimesh.load(out / "points.ply")
    assert len(cloud.vertices) == round(0.8 * N * H * W)
    glb = trimesh.load(out / "scene.glb")
    [glb_cloud] = [g for g in glb.geometry.values() if isinstance(g, trimesh.PointCloud)]
    assert len(glb_cloud.vertices) == len(cloud.vertices)
    assert sum(name.startswith("camera_") for name in glb.graph.nodes_geometry) == N
    for index in range(N):
        decoded = load_depth_png16(out / "depth" / f"view_{index:03d}.png")
        np.testing.assert_allclose(decoded, scene["depth"][index], atol=1e-4)


def _bad(scene: dict[str, np.ndarray], **changes: object) -> dict[str, object]:
    return {**scene, **changes}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {"camera_poses": s["camera_poses"][:2]}, "views but `camera_poses` has"),
        (lambda s: {"images": s["images"][:, :, :4]}, "`images`"),
        (lambda s: {"images": s["images"].astype(np.float32)}, "uint8"),
        (lambda s: {"depth": s["depth"][:, :4]}, "`depth`"),
        (lambda s: {"confidence": s["confidence"][:2]}, "`confidence`"),
        (lambda s: {"world_points": s["world_points"][None]}, "pass one scene"),
        (lambda s: {"camera_poses": s["camera_poses"][:0]}, "zero views"),
        (lambda s: {"camera_poses": s["camera_poses"] * 2}, "last row"),
        (lambda s: {"world_points": np.full_like(s["world_points"], np.nan)}, "filtered away"),
    ],
)
def test_export_rejects_bad_input(scene, tmp_path, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        export_reconstruction(tmp_path / "out", **_bad(scene, **change(scene)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "call",
    [
        lambda s, p, out: save_scene_glb(out / "s.glb", np.zeros((2, 3)), np.zeros((2, 3), np.uint8), p),
        lambda s, p, out: save_cameras_json(out / "c.json", p, (H, W)),
        lambda s, p, out: export.robust_scene_scale(s["world_points"], p),
        lambda s, p, out: export.export_colmap(
            out, **_bad(s, camera_poses=p), intrinsics=np.tile(np.eye(3), (N, 1, 1))
        ),
    ],
)
def test_every_public_writer_names_bad_poses(scene, tmp_path, call):
    with pytest.raises(ValueError, match=r"last row \[0, 0, 0, 1\]"):
        call({k: v for k, v in scene.items() if k != "depth"}, scene["camera_poses"] * 2, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_poses_are_checked_once_when_the_scene_and_a_colmap_model_are_written(scene, tmp_path, monkeypatch):
    # what `g2vlm reconstruct --colmap` does: one check, then the writers take the checked arrays as they are
    calls = []
    real = validation.validate_poses

    def counting(camera_poses):
        calls.append(camera_poses)
        return real(camera_poses)

    for name, module in list(sys.modules.items()):
        if name.startswith("g2vlm_hf.export") and hasattr(module, "validate_poses"):
            monkeypatch.setattr(module, "validate_poses", counting)
    intrinsics = np.tile(np.array([[6.0, 0.0, W / 2], [0.0, 6.0, H / 2], [0.0, 0.0, 1.0]]), (N, 1, 1))
    checked = export.check_scene(
        scene["camera_poses"], scene["world_points"], scene["images"], depth=scene["depth"], intrinsics=intrinsics
    )
    export.write_scene(tmp_path / "scene", checked)
    export.write_colmap(tmp_path / "colmap", checked)
    assert len(calls) == 1
    export_reconstruction(tmp_path / "again", **scene)
    assert len(calls) == 2  # the public entry point checks once too (it was four times)


def test_zero_views_rejected_by_filter():
    with pytest.raises(ValueError, match="zero views"):
        filter_points(np.zeros((0, H, W, 3)), np.zeros((0, H, W, 3), dtype=np.uint8))


def test_bad_percentile_and_max_points(scene):
    with pytest.raises(ValueError, match="confidence_percentile"):
        compute_keep_mask(scene["world_points"], scene["confidence"], confidence_percentile=120.0)
    with pytest.raises(ValueError, match="max_points"):
        filter_points(scene["world_points"], scene["images"], max_points=0)


@pytest.mark.parametrize("frustum_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_frustum_scale_must_be_positive_and_finite(scene, tmp_path, frustum_scale):
    points, colours = filter_points(scene["world_points"], scene["images"])
    with pytest.raises(ValueError, match="`frustum_scale` must be a positive finite number"):
        save_scene_glb(tmp_path / "s.glb", points, colours, scene["camera_poses"], frustum_scale=frustum_scale)
    assert not (tmp_path / "s.glb").exists()


def test_missing_trimesh_says_how_to_install(scene, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trimesh", None)
    with pytest.raises(ImportError, match=r'pip install "g2vlm-hf\[export\]"'):
        save_point_cloud_ply(tmp_path / "x.ply", np.zeros((1, 3)), np.zeros((1, 3), dtype=np.uint8))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------- atomicity


def test_failed_write_keeps_old_file_and_leaves_no_temporary(scene, tmp_path, monkeypatch):
    target = tmp_path / "points.ply"
    target.write_bytes(b"old")

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_point_cloud_ply(target, np.zeros((4, 3)), np.zeros((4, 3), dtype=np.uint8))
    assert os.listdir(tmp_path) == ["points.ply"]
    assert target.read_bytes() == b"old"


def test_export_failing_midway_leaves_no_files(scene, tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace_then_fail(source, destination):
        calls.append(destination)
        if len(calls) == 4:  # after scene.glb, points.ply and cameras.json, on the first depth map
            raise OSError("disk full")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace_then_fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        export_reconstruction(out, **scene)
    assert len(calls) == 4
    assert not out.exists()


def test_export_failing_while_encoding_writes_nothing(scene, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_encode = scene_module.encode_depth_png16

    def encode_then_fail(depth):
        if encode_then_fail.calls == 1:
            raise RuntimeError("encoder crashed")
        encode_then_fail.calls += 1
        return real_encode(depth)

    encode_then_fail.calls = 0
    monkeypatch.setattr(scene_module, "encode_depth_png16", encode_then_fail)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        export_reconstruction(out, **scene)
    assert list(Path(out).rglob("*")) == []


@pytest.mark.parametrize(
    ("options", "writer"),
    [(export.SceneExportOptions, export.write_scene), (export.ColmapExportOptions, export.write_colmap)],
)
def test_forwarded_option_types_name_exactly_the_writers_options(options, writer):
    """`export_reconstruction` / `export_colmap` forward `**options` typed by these TypedDicts: they must name the
    writer's keyword-only options, no more, no fewer, or editors would complete options that fail."""
    import inspect

    keyword_only = {
        name
        for name, parameter in inspect.signature(writer).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    assert set(options.__annotations__) == keyword_only


@pytest.mark.parametrize("colour", [(300, 0, 0), (1.0, 0.0, 0.0), (255, 0), "red", (-1, 0, 0)])
def test_a_frustum_colour_outside_8_bit_rgb_is_refused(scene, tmp_path, colour):
    """(300, 0, 0) wrapped to 44 and (1.0, 0, 0) came out nearly black: both silently."""
    points, colours = filter_points(scene["world_points"], scene["images"], max_points=100)
    with pytest.raises(ValueError, match=r"`frustum_colour` must be three integers in \[0, 255\]"):
        save_scene_glb(tmp_path / "scene.glb", points, colours, scene["camera_poses"], frustum_colour=colour)
    assert list(tmp_path.iterdir()) == []


def test_one_frustum_colour_for_every_camera(scene, tmp_path):
    points, colours = filter_points(scene["world_points"], scene["images"], max_points=100)
    path = save_scene_glb(
        tmp_path / "s.glb", points, colours, scene["camera_poses"], frustum_colour=np.array([9, 99, 199])
    )
    loaded = trimesh.load(path)
    for index in range(N):
        frustum = loaded.geometry[f"camera_{index}"]
        np.testing.assert_array_equal(np.unique(frustum.visual.vertex_colors, axis=0), [[9, 99, 199, 255]])


def test_export_model_scene_colours_by_the_views_and_takes_either_processor(converted_tiny, tmp_path):
    """The model's own reconstruction, exported with the processor's geometry views: the point colours are the
    views' pixels (unnormalised), whichever of the two processors is given; a wrong scene or object is named."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hub_testing import VIEWS

    model = AutoModelForImageTextToText.from_pretrained(converted_tiny).eval()
    processor = AutoProcessor.from_pretrained(converted_tiny)
    inputs = processor(geometry_images=[str(view) for view in VIEWS], return_tensors="pt", target_width=56)
    with torch.no_grad():
        output = model.reconstruct(**inputs)
    pixels = inputs["geometry_pixel_values"]
    written = {}
    for name, which in (("geometry", processor.geometry_image_processor), ("full", processor)):
        files = export.export_model_scene(tmp_path / name, output, pixels, which, point_colouring="image")
        written[name] = {path.relative_to(tmp_path / name): path.read_bytes() for path in files}
    assert written["geometry"] == written["full"]
    cloud = trimesh.load(tmp_path / "full" / "points.ply")
    views = (pixels[0].permute(0, 2, 3, 1).numpy() * [0.229, 0.224, 0.225] + [0.485, 0.456, 0.406]) * 255
    palette = {tuple(int(c) for c in colour) for colour in np.clip(np.rint(views), 0, 255).reshape(-1, 3)}
    assert {tuple(colour) for colour in np.asarray(cloud.colors)[:, :3]} <= palette
    with pytest.raises(ValueError, match=r"scene=1 is out of range: the reconstruction holds 1 scene"):
        export.export_model_scene(tmp_path / "bad", output, pixels, processor, scene=1)
    with pytest.raises(ValueError, match="got a dict"):
        export.export_model_scene(tmp_path / "bad", output, pixels, {})
    assert not (tmp_path / "bad").exists()
