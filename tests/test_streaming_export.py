"""The streaming export (`export/streaming.py`) against arrays the tests construct: depth maps, cameras, the point
cloud (PLY and GLB) and the COLMAP model written chunk by chunk equal the expectation (and the one-pass export's
files byte for byte when nothing is subsampled); the point budget keeps a seeded uniform subset whatever the chunking;
a failure leaves nothing; memory does not grow with the number of views."""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from g2vlm_hf.export import check_scene, export_colmap, export_reconstruction, load_depth_png16, streaming
from g2vlm_hf.export.streaming import PointReservoir, StreamingSceneWriter
from g2vlm_hf.modeling.outputs import G2VLMReconstructionOutput
from g2vlm_hf.processing import G2VLMGeometryImageProcessor

trimesh = pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")

HEIGHT, WIDTH = 24, 32


def rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def synthetic_scene(num_views: int, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> dict:
    """Cameras around the origin with pinhole intrinsics (view 2's camera unusable), per-pixel depths, world points
    from them (a few pixels NaN) and random colours."""
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (num_views, 1, 1))
    for pose in poses:
        pose[:3, :3], pose[:3, 3] = rotation(rng), rng.normal(0, 2, 3)
    intrinsics = np.tile(np.array([[30.0, 0, width / 2], [0, 30.0, height / 2], [0, 0, 1]]), (num_views, 1, 1))
    intrinsics[:, 0, 0] += rng.uniform(-2, 2, num_views)
    if num_views > 2:
        intrinsics[2] = np.nan
    depth = rng.uniform(1, 5, (num_views, height, width))
    rows, columns = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    rays = np.stack([(columns - width / 2) / 30.0, (rows - height / 2) / 30.0, np.ones_like(rows)], -1)
    local = rays[None] * depth[..., None]
    world = np.einsum("nij,nhwj->nhwi", poses[:, :3, :3], local) + poses[:, None, None, :3, 3]
    world[rng.random(world.shape[:3]) < 0.05] = np.nan
    return dict(
        camera_poses=poses.astype(np.float32),
        world_points=world.astype(np.float32),
        depth=depth.astype(np.float32),
        images=rng.integers(0, 256, (num_views, height, width, 3), dtype=np.uint8),
        intrinsics=intrinsics.astype(np.float32),
    )


def stream(arrays: dict, folder, chunk_sizes, sizes=None, view_names=None, **options) -> list:
    """Write `arrays` through the streaming writer in chunks of the given sizes (cycled)."""
    count = len(arrays["camera_poses"])
    with StreamingSceneWriter(folder / "scene", colmap_dir=folder / "sparse", **options) as writer:
        start, step = 0, 0
        while start < count:
            stop = min(count, start + chunk_sizes[step % len(chunk_sizes)])
            part = check_scene(**{name: value[start:stop] for name, value in arrays.items()})
            names = None if view_names is None else view_names[start:stop]
            writer.add_views(part, None if sizes is None else sizes[start:stop], view_names=names)
            start, step = stop, step + 1
    return writer.written


def one_pass(arrays: dict, folder, scene_options: dict, colmap_options: dict) -> list:
    """The one-pass export of `arrays` (`folder/scene` and its COLMAP model `folder/sparse`): every file written."""
    written = export_reconstruction(folder / "scene", **arrays, **scene_options)
    return written + export_colmap(
        folder / "sparse", **{name: value for name, value in arrays.items() if name != "depth"}, **colmap_options
    )


def assert_same_files(streamed: list, expected: list, root_streamed, root_expected) -> None:
    """The same files, relative to their roots, with the same bytes."""
    names = sorted(str(path.relative_to(root_expected)) for path in expected)
    assert sorted(str(path.relative_to(root_streamed)) for path in streamed) == names
    for name in names:
        assert (root_streamed / name).read_bytes() == (root_expected / name).read_bytes(), name


def expected_cloud(arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The finite points in (view, row, column) order, their colours and views."""
    keep = np.isfinite(arrays["world_points"]).all(-1)
    return arrays["world_points"][keep], arrays["images"][keep], np.nonzero(keep)[0]


def read_colmap_points(path) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split() for line in (path / "points3D.txt").read_text().splitlines() if not line.startswith("#")]
    return np.array([[float(v) for v in row[1:4]] for row in rows]), np.array([int(row[8]) - 1 for row in rows])


def test_every_output_matches_the_arrays(tmp_path):
    arrays = synthetic_scene(11)
    sizes = [(480 + index, 640) for index in range(11)]
    stream(arrays, tmp_path, [4, 3], sizes=sizes, max_points=None)
    scene, sparse = tmp_path / "scene", tmp_path / "sparse"

    for index in range(11):
        depth = load_depth_png16(scene / "depth" / f"view_{index:03d}.png")
        step = np.ptp(arrays["depth"][index]) / 65534
        np.testing.assert_allclose(depth, arrays["depth"][index], atol=step, rtol=1e-6)
        with Image.open(scene / "depth" / f"view_{index:03d}_preview.png") as preview:
            assert preview.mode == "RGB" and preview.size == (WIDTH, HEIGHT)

    cameras = json.loads((scene / "cameras.json").read_text())["cameras"]
    assert [camera["index"] for camera in cameras] == list(range(11))
    np.testing.assert_allclose([camera["camera_to_world"] for camera in cameras], arrays["camera_poses"], rtol=1e-6)
    assert cameras[2]["intrinsics"][0][0] is None
    np.testing.assert_allclose(cameras[5]["intrinsics"], arrays["intrinsics"][5], rtol=1e-6)
    assert cameras[7]["original"]["height"] == 487 and cameras[7]["width"] == WIDTH
    np.testing.assert_allclose(
        cameras[7]["original"]["intrinsics"][0][0], arrays["intrinsics"][7, 0, 0] * 640 / WIDTH, rtol=1e-6
    )

    points, colours, views = expected_cloud(arrays)
    ply = trimesh.load(scene / "points.ply")
    np.testing.assert_array_equal(np.asarray(ply.vertices, dtype=np.float32), points)
    np.testing.assert_array_equal(np.asarray(ply.colors)[:, :3], colours)
    glb = trimesh.load(scene / "scene.glb")
    np.testing.assert_allclose(np.asarray(glb.geometry["points"].vertices), points, rtol=1e-6)
    for index in range(11):
        transform, _ = glb.graph.get(f"camera_{index}")
        np.testing.assert_allclose(transform, arrays["camera_poses"][index], atol=1e-6)

    lines = [line for line in (sparse / "cameras.txt").read_text().splitlines() if not line.startswith("#")]
    assert [int(line.split()[0]) for line in lines] == [index + 1 for index in range(11) if index != 2]
    fx = float(lines[4].split()[4])  # view 5
    assert fx == pytest.approx(float(arrays["intrinsics"][5, 0, 0]))
    images = [line for line in (sparse / "images.txt").read_text().splitlines() if not line.startswith("#")]
    header = images[2 * 4].split()  # view 5
    qw, qx, qy, qz = map(float, header[1:5])
    world_to_camera = np.array([
        [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qz * qw), 2 * (qx * qz + qy * qw)],
        [2 * (qx * qy + qz * qw), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qx * qw)],
        [2 * (qx * qz - qy * qw), 2 * (qy * qz + qx * qw), 1 - 2 * (qx * qx + qy * qy)],
    ])  # fmt: skip
    np.testing.assert_allclose(world_to_camera, arrays["camera_poses"][5, :3, :3].T, atol=1e-6)
    np.testing.assert_allclose(
        -world_to_camera.T @ np.array(header[5:8], dtype=float), arrays["camera_poses"][5, :3, 3], atol=1e-5
    )
    colmap_points, colmap_views = read_colmap_points(sparse)
    np.testing.assert_array_equal(colmap_points.astype(np.float32), points[views != 2])
    np.testing.assert_array_equal(colmap_views, views[views != 2])
    assert sorted(path.name for path in (sparse / "images").iterdir()) == [
        f"view_{i:03d}.png" for i in range(11) if i != 2
    ]


def test_without_subsampling_the_files_are_the_one_pass_export(tmp_path):
    arrays = synthetic_scene(9, seed=3)
    streamed = stream(arrays, tmp_path / "streamed", [2, 5], max_points=None)
    expected = one_pass(arrays, tmp_path / "one", scene_options={}, colmap_options={})
    assert_same_files(streamed, expected, tmp_path / "streamed", tmp_path / "one")


def test_files_written_in_batches_are_the_one_pass_export(tmp_path, monkeypatch):
    """520 views: `cameras.json` is encoded 256 views at a time (three batches, the last of 8 views); `points3D.txt`
    in blocks of 1,000 points here (100,000 by default: 12 blocks of about 11,900 points)."""
    monkeypatch.setattr(streaming, "POINT_BATCH", 1000)
    arrays = synthetic_scene(520, seed=8, height=4, width=6)
    sizes = [(480 + index % 7, 640) for index in range(520)]
    names = [f"IMG_{index:04d} (copy).JPG" for index in range(520)]  # any text: a name is only recorded
    streamed = stream(arrays, tmp_path / "streamed", [100, 37], sizes=sizes, view_names=names, max_points=None)
    one_pass = export_reconstruction(tmp_path / "one" / "scene", **arrays, original_sizes=sizes, view_names=names)
    one_pass += export_colmap(tmp_path / "one" / "sparse", **{k: v for k, v in arrays.items() if k != "depth"})
    assert len(streamed) == len(one_pass)
    for name in ("scene/cameras.json", "sparse/images.txt", "sparse/points3D.txt", "scene/points.ply"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    cameras = json.loads((tmp_path / "streamed" / "scene" / "cameras.json").read_text())["cameras"]
    assert [camera["index"] for camera in cameras] == list(range(520))
    assert [camera["name"] for camera in cameras] == names


@settings(max_examples=200, deadline=None, database=None)
@given(
    chunks=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    max_points=st.one_of(st.none(), st.integers(1, 120)),
    seed=st.integers(0, 2**16),
)
def test_the_reservoir_keeps_the_points_of_smallest_key_whatever_the_chunking(chunks, max_points, seed):
    """The module's definition: one key per point offered, drawn in stream order from one generator seeded with
    `seed`; the `max_points` points of smallest key are kept (all with None), with their colours, in stream order."""
    rng = np.random.default_rng(seed + 1)
    total = sum(chunks)
    positions = np.cumsum(rng.integers(1, 4, total))  # where the points lie in the stream of all pixels
    points, colours = rng.normal(size=(total, 3)).astype(np.float32), rng.integers(0, 256, (total, 3), dtype=np.uint8)
    reservoir = PointReservoir(max_points, seed)
    for start, stop in zip(np.cumsum([0, *chunks[:-1]]), np.cumsum(chunks), strict=True):
        reservoir.add(positions[start:stop], points[start:stop], colours[start:stop])
    reservoir.finish()
    keys = np.random.default_rng(seed).random(total)
    kept = np.sort(np.argsort(keys)[:max_points]) if max_points is not None else np.arange(total)
    assert reservoir.seen == total
    np.testing.assert_array_equal(reservoir.order, positions[kept])
    np.testing.assert_array_equal(reservoir.points, points[kept])
    np.testing.assert_array_equal(reservoir.colours, colours[kept])


def test_min_confidence_keeps_the_points_at_or_above_it(tmp_path):
    arrays = synthetic_scene(6, seed=9)
    confidence = np.random.default_rng(9).uniform(0, 2, arrays["depth"].shape).astype(np.float32)
    confidence[0, 0, :4] = np.nan
    confidence[1, 0, 0] = 1.0  # exactly the threshold, on a finite point: kept (`>` in place of `>=` drops it)
    assert np.isfinite(arrays["world_points"][1, 0, 0]).all()
    stream({**arrays, "confidence": confidence}, tmp_path, [4], max_points=None, min_confidence=1.0)
    keep = np.isfinite(arrays["world_points"]).all(-1) & (np.nan_to_num(confidence, nan=-1.0) >= 1.0)
    ply = np.asarray(trimesh.load(tmp_path / "scene" / "points.ply").vertices, dtype=np.float32)
    np.testing.assert_array_equal(ply, arrays["world_points"][keep])
    assert 0.3 < keep.mean() < 0.6


def test_a_reservoir_needs_room_for_a_point():
    with pytest.raises(ValueError, match="`max_points` must be at least 1, got 0"):
        PointReservoir(0, seed=0)
    reservoir = PointReservoir(1, seed=0)
    reservoir.add(np.arange(5), np.zeros((5, 3)), np.zeros((5, 3), dtype=np.uint8))
    assert len(reservoir.order) == 1


def test_the_budget_keeps_a_seeded_uniform_subset_whatever_the_chunking(tmp_path):
    arrays = synthetic_scene(40, seed=4)
    points, _, views = expected_cloud(arrays)
    budget = 4000  # of about 29,000 finite points
    stream(arrays, tmp_path / "a", [7], max_points=budget, seed=5)
    stream(arrays, tmp_path / "b", [1, 16, 3], max_points=budget, seed=5)
    stream(arrays, tmp_path / "c", [7], max_points=budget, seed=6)
    for name in ("scene/points.ply", "scene/scene.glb", "sparse/points3D.txt", "sparse/images.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    kept = np.asarray(trimesh.load(tmp_path / "a" / "scene" / "points.ply").vertices, dtype=np.float32)
    other = np.asarray(trimesh.load(tmp_path / "c" / "scene" / "points.ply").vertices, dtype=np.float32)
    assert len(kept) == len(other) == budget and not np.array_equal(kept, other)
    # a subset of the finite points, in their original order
    index = {tuple(point): position for position, point in enumerate(points)}
    positions = np.array([index[tuple(point)] for point in kept])
    assert (np.diff(positions) > 0).all()
    # uniform: every view keeps its share (about 100 points each; 6 sigma bounds)
    counts = np.bincount(views[positions], minlength=40)
    expected = budget * np.bincount(views, minlength=40) / len(points)
    assert (np.abs(counts - expected) < 6 * np.sqrt(expected)).all()
    colmap_points, _ = read_colmap_points(tmp_path / "a" / "sparse")
    np.testing.assert_array_equal(colmap_points.astype(np.float32), kept[views[positions] != 2])


def test_a_failure_leaves_nothing(tmp_path):
    arrays = synthetic_scene(6)
    writer = StreamingSceneWriter(tmp_path / "out" / "scene", colmap_dir=tmp_path / "out" / "sparse")
    with pytest.raises(RuntimeError, match="interrupted"), writer:
        writer.add_views(check_scene(**{name: value[:3] for name, value in arrays.items()}))
        assert (tmp_path / "out" / "scene" / "depth" / "view_002.png").exists()  # written as the chunk came
        raise RuntimeError("interrupted")
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("not the writer's")
    nan = {name: value[:2].copy() for name, value in arrays.items()}
    nan["world_points"][:] = np.nan
    with pytest.raises(ValueError, match="filtered away"), StreamingSceneWriter(tmp_path / "kept") as writer:
        writer.add_views(check_scene(**nan))
    assert [path.name for path in (tmp_path / "kept").iterdir()] == ["mine.txt"]


def test_chunks_of_the_stream_are_taken_as_they_come(tmp_path):
    arrays = synthetic_scene(5)
    processor = G2VLMGeometryImageProcessor()
    mean, std = torch.tensor(processor.image_mean).view(3, 1, 1), torch.tensor(processor.image_std).view(3, 1, 1)
    pixels = (torch.from_numpy(arrays["images"]).movedim(-1, 1).float() / 255 - mean) / std
    fields = {
        name: torch.from_numpy(arrays[name])[None] for name in ("camera_poses", "world_points", "depth", "intrinsics")
    }
    chunks = [
        SimpleNamespace(view_indices=range(start, stop), geometry_pixel_values=pixels[None, start:stop],
                        reconstruction=G2VLMReconstructionOutput(**{k: v[:, start:stop] for k, v in fields.items()}))
        for start, stop in [(0, 3), (3, 5)]
    ]  # fmt: skip
    with StreamingSceneWriter(tmp_path / "scene", max_points=None) as writer:
        with pytest.raises(ValueError, match="in order"):
            writer.add_chunk(chunks[1], processor)
        for chunk in chunks:
            writer.add_chunk(chunk, processor)
    ply = trimesh.load(tmp_path / "scene" / "points.ply")
    points, colours, _ = expected_cloud(arrays)
    np.testing.assert_array_equal(np.asarray(ply.vertices, dtype=np.float32), points)
    np.testing.assert_array_equal(np.asarray(ply.colors)[:, :3], colours)


def test_views_of_another_size_are_refused(tmp_path):
    with StreamingSceneWriter(tmp_path / "scene") as writer:
        writer.add_views(check_scene(**synthetic_scene(2)))
        with pytest.raises(ValueError, match="one size"):
            writer.add_views(check_scene(**synthetic_scene(2, height=16)))


def test_bad_settings_and_inconsistent_chunks_are_refused_and_nothing_is_left(tmp_path):
    for options, message in (
        (dict(point_colouring="depth"), "point_colouring"),
        (dict(frustum_scale=0.0), "frustum_scale"),
    ):
        with pytest.raises(ValueError, match=message):
            StreamingSceneWriter(tmp_path / "scene", **options)
    arrays = synthetic_scene(4)
    views = [check_scene(**{name: value[start : start + 2] for name, value in arrays.items()}) for start in (0, 2)]
    without = {name: value[2:] for name, value in arrays.items() if name not in ("intrinsics", "depth")}
    no_depth, no_intrinsics = check_scene(**without), check_scene(**without, depth=arrays["depth"][2:])
    sizes = [(480, 640)] * 2
    refusals = [  # (the writer's options, the first chunk's call, the second chunk's call, the error)
        (dict(), (views[0],), (no_depth,), "no `depth`"),
        (dict(colmap_dir=tmp_path / "sparse"), (no_intrinsics,), None, "COLMAP"),
        (dict(), (views[0], sizes), (views[1],), "original_sizes"),
        (dict(), (views[0],), (views[1], sizes), "original_sizes"),
        (dict(), (views[0],), (no_intrinsics,), "intrinsics"),
        (dict(), (views[0], None, None, ["a", "b"]), (views[1],), "view_names"),
        (dict(), (views[0],), (views[1], None, None, ["c", "d"]), "view_names"),
        (dict(), (views[0], None, None, ["a"]), None, "`view_names` has 1 names for 2 views"),
        (dict(), (views[0], None, ["a.png", "b.png"]), (views[1], None, ["c.png", "a.png"]), "new distinct names"),
        (dict(), (views[0], None, ["a.png", "b c.png"]), None, "without spaces"),
        (dict(colmap_dir=tmp_path / "sparse"), (views[0], None, ["a.png", "../b.png"]), None, "plain file names"),
        (dict(colmap_dir=tmp_path / "sparse"), (views[0], None, ["a.png", "b.jpg"]), None, "do not end in .png"),
        (dict(), (views[0], None, ["a.png"]), None, "2 new distinct names"),
    ]
    for options, first, second, message in refusals:
        with pytest.raises(ValueError, match=message), StreamingSceneWriter(tmp_path / "scene", **options) as writer:
            writer.add_views(*first)
            writer.add_views(*second)
        assert not (tmp_path / "scene").exists() and not (tmp_path / "sparse").exists(), message
    with StreamingSceneWriter(tmp_path / "scene") as writer:
        writer.add_views(views[0])
    with pytest.raises(ValueError, match="closed"):
        writer.add_views(views[1])


def peak_memory(num_views: int, folder) -> int:
    """Peak traced memory of streaming `num_views` 48x64 views in chunks of 16 under a 30,000-point budget (each
    chunk's arrays are made as the chunk is needed, as a reconstruction stream would)."""
    tracemalloc.start()
    with StreamingSceneWriter(folder, colmap_dir=folder / "sparse", max_points=30_000) as writer:
        for start in range(0, num_views, 16):
            writer.add_views(check_scene(**synthetic_scene(16, seed=start, height=48, width=64)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_the_number_of_views(tmp_path):
    """Each size is streamed twice and its smaller peak kept: a run may be charged with a one-off resize of the
    interpreter's table of interned strings (pathlib interns each file name; 7.5 MiB seen at 1024 views when earlier
    tests had filled it), an allocation sized by the whole process, not by the views, which cannot recur within the
    next run's few thousand names."""
    small, large = (min(peak_memory(views, tmp_path / f"{views}-{run}") for run in range(2)) for views in (64, 1024))
    assert large < 1.2 * small, f"peak {large / 2**20:.1f} MiB for 1024 views vs {small / 2**20:.1f} MiB for 64"
