"""What the depth PNG codec, the depth previews, the GLB scene and the PLY writer promise beyond tests/test_export.py
(found by mutation testing): the invalid-depth rule, the text-chunk contract, the preview's percentile scaling and
ramp ends, the frustum tubes' geometry and the per-view colours."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from g2vlm_hf.export import depth_png, glb
from g2vlm_hf.export.depth_png import colourise_depth, load_depth_png16, save_depth_png16

trimesh = pytest.importorskip("trimesh")


def decode_by_the_documented_formula(path):
    """The depth of a PNG from PIL and the text chunks alone: 0 is invalid, else min + (v - 1) / 65534 * span."""
    with Image.open(path) as image:
        codes = np.array(image).astype(np.float64)
        low, high = float(image.text["depth_min"]), float(image.text["depth_max"])
    return np.where(codes == 0, np.nan, low + (codes - 1) / 65534 * (high - low)), codes


# ------------------------------------------------------------------------------------------------------ depth PNG


def test_zero_depth_is_invalid_and_small_positive_depth_is_kept(tmp_path):
    """Depth 0 means "no depth" (code 0, NaN back); depths below 1 (e.g. 0.05 to 0.9 metres) are ordinary values."""
    depth = np.array([[0.0, 0.05, 0.3], [0.9, 0.0, 0.6]])
    assert save_depth_png16(tmp_path / "d.png", depth) == (0.05, 0.9)
    decoded, codes = decode_by_the_documented_formula(tmp_path / "d.png")
    assert codes[depth == 0].tolist() == [0, 0]
    assert codes.min() == 0 and sorted(codes[depth > 0].tolist())[0] == 1 and codes.max() == 65535
    step = (0.9 - 0.05) / 65534
    np.testing.assert_allclose(decoded[depth > 0], depth[depth > 0], rtol=0, atol=step / 2 + 1e-12)
    loaded = load_depth_png16(tmp_path / "d.png")
    assert np.isnan(loaded[depth == 0]).all()
    np.testing.assert_allclose(loaded[depth > 0], depth[depth > 0], rtol=0, atol=step / 2 + 1e-12)


def png16_with_text(path, **text):
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    Image.fromarray(np.full((2, 2), 7, dtype=np.uint16)).save(path, format="PNG", pnginfo=info)
    return path


@pytest.mark.parametrize("text", [{"depth_min": "1.0"}, {"depth_max": "2.0"}, {}])
def test_a_png_missing_either_range_chunk_is_refused_with_a_value_error(tmp_path, text):
    """Only a PNG with both `depth_min` and `depth_max` is a depth PNG; one of the two is not enough."""
    path = png16_with_text(tmp_path / "x.png", **text)
    with pytest.raises(ValueError, match="depth_min/depth_max"):
        load_depth_png16(path)


# --------------------------------------------------------------------------------------------------- depth preview


def test_preview_default_percentiles_are_2_and_98():
    """Disparities 1..101 (one pixel each): the 2nd percentile is 3 and the 98th is 99, so exactly three pixels
    (disparity 1, 2, 3) are clipped to the far colour and three (99, 100, 101) to the near colour."""
    depth = (1.0 / np.arange(1.0, 102.0)).reshape(1, 101)
    image = colourise_depth(depth).reshape(-1, 3)
    assert (image == image[0]).all(axis=1).sum() == 3
    assert (image == image[-1]).all(axis=1).sum() == 3
    assert not (image[3] == image[0]).all() and not (image[-4] == image[-1]).all()


def test_preview_ends_are_the_ramp_ends_and_the_middle_disparity_is_the_middle_anchor():
    """With percentiles 0 and 100 the farthest pixel is the ramp's first (dark) anchor, the nearest its last (light)
    one and the pixel halfway in disparity its middle anchor (7 anchors: position 0.5 is anchor 3 exactly)."""
    ramp = depth_png.DEPTH_RAMP
    depth = np.array([[1.0 / 1.0, 1.0 / 2.0, 1.0 / 3.0]])  # disparities 1, 2, 3
    image = colourise_depth(depth, low_percentile=0.0, high_percentile=100.0)
    np.testing.assert_array_equal(image[0], ramp[[0, 3, 6]].astype(np.uint8))
    assert image[0, 0].astype(int).sum() < image[0, 2].astype(int).sum()  # far dark, near light


def test_preview_of_zero_depth_is_black():
    """Depth 0 is invalid: black, and it does not become an infinitely near pixel that moves the others."""
    depth = np.array([[0.0, 1.0, 2.0, 4.0]])
    image = colourise_depth(depth, low_percentile=0.0, high_percentile=100.0)
    assert image[0, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(image[0, 1], depth_png.DEPTH_RAMP[-1].astype(np.uint8))
    np.testing.assert_array_equal(image[0, 3], depth_png.DEPTH_RAMP[0].astype(np.uint8))


def distance_to_ramp(colour):
    """Euclidean distance of an RGB colour to the piecewise-linear ramp through DEPTH_RAMP's anchors."""
    ramp = depth_png.DEPTH_RAMP
    best = np.inf
    for start, end in itertools.pairwise(ramp):
        t = np.clip(np.dot(colour - start, end - start) / np.dot(end - start, end - start), 0.0, 1.0)
        best = min(best, np.linalg.norm(colour - (start + t * (end - start))))
    return best


def test_preview_of_a_constant_depth_is_one_colour_on_the_ramp():
    """A flat wall (every valid pixel at 3 m) has no disparity spread: one colour, taken from the ramp."""
    depth = np.full((3, 4), 3.0)
    depth[0, 0] = np.nan
    image = colourise_depth(depth)
    valid = image.reshape(-1, 3)[1:]
    assert (valid == valid[0]).all()
    assert distance_to_ramp(valid[0].astype(np.float64)) <= 1.0


@pytest.mark.parametrize(("low", "high"), [(0.0, 50.0), (50.0, 100.0), (0.0, 100.0), (0.5, 99.5)])
def test_preview_accepts_percentiles_up_to_the_inclusive_ends(low, high):
    """`0 <= low_percentile < high_percentile <= 100`: the ends 0 and 100 are allowed."""
    depth = np.array([[1.0, 2.0, 3.0, 4.0]])
    assert colourise_depth(depth, low_percentile=low, high_percentile=high).shape == (1, 4, 3)


@pytest.mark.parametrize(("low", "high"), [(50.0, 50.0), (-0.5, 50.0), (10.0, 100.5), (60.0, 40.0)])
def test_preview_refuses_percentiles_outside_the_range_or_not_increasing(low, high):
    """Equal percentiles, a negative low one or a high one above 100 are refused."""
    with pytest.raises(ValueError, match="low_percentile < high_percentile"):
        colourise_depth(np.ones((2, 2)), low_percentile=low, high_percentile=high)


# ------------------------------------------------------------------------------------------------------------- GLB


def sphere(radius, count=400, centre=(0.0, 0.0, 0.0), seed=0):
    directions = np.random.default_rng(seed).normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return np.asarray(centre) + radius * directions


def one_camera_scene(image_size=(2, 4)):
    """One camera at the origin looking down +z, every point 10 away: the frustum is 0.15 * 10 = 1.5 deep."""
    points = sphere(10.0).astype(np.float32)
    colours = np.zeros((len(points), 3), np.uint8)
    scene = glb.build_scene(
        points, colours, np.eye(4)[None], image_size=image_size, frustum_scale=0.15, frustum_colour=None
    )
    frustum = scene.geometry["camera_0"]
    return np.asarray(frustum.vertices, dtype=np.float64), np.asarray(frustum.faces)


def test_frustum_edges_are_the_four_sides_from_the_camera_centre_and_the_four_base_edges():
    """Each group of 8 vertices is one tube: its two rings of 4 are centred on the ends of one of the pyramid's
    8 edges. Depth 1.5; the base is as tall as the frustum is deep (1.5) and, for 2x4 views, twice as wide (3)."""
    vertices, _ = one_camera_scene()
    assert vertices.shape == (64, 3)
    ends = vertices.reshape(8, 2, 4, 3).mean(axis=2)
    corners = [(-1.5, -0.75, 1.5), (1.5, -0.75, 1.5), (1.5, 0.75, 1.5), (-1.5, 0.75, 1.5)]
    apex = (0.0, 0.0, 0.0)
    expected = {frozenset([apex, c]) for c in corners} | {
        frozenset([corners[i], corners[(i + 1) % 4]]) for i in range(4)
    }
    got = {frozenset(tuple(float(x) for x in np.round(end, 9) + 0.0) for end in pair) for pair in ends}
    assert got == expected


def test_frustum_tubes_are_straight_square_tubes_of_the_documented_width():
    """Around each edge: a square (side 0.04 * depth = 0.06) perpendicular to the edge, the same at both ends."""
    vertices, _ = one_camera_scene()
    width = 0.04 * 1.5
    for tube in vertices.reshape(8, 2, 4, 3):
        start, end = tube.mean(axis=1)
        direction = (end - start) / np.linalg.norm(end - start)
        offsets = tube - tube.mean(axis=1, keepdims=True)
        np.testing.assert_allclose(offsets[0], offsets[1], atol=1e-12)  # not twisted
        ring = offsets[0]
        np.testing.assert_allclose(ring @ direction, 0.0, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(ring, axis=1), width / np.sqrt(2), rtol=1e-9)
        for k in range(4):  # consecutive corners are adjacent: a side of length `width` apart
            np.testing.assert_allclose(np.linalg.norm(ring[k] - ring[(k + 1) % 4]), width, rtol=1e-9)


def test_frustum_tube_faces_cover_each_tube_side_and_face_outwards():
    """glTF materials are single-sided: the 8 triangles of a tube must lie on its 4 sides (area 4 * width * length)
    and face away from its axis, or viewers cull them."""
    vertices, faces = one_camera_scene()
    width = 0.04 * 1.5
    assert faces.shape == (64, 3)
    for index in range(8):
        tube_faces = faces[8 * index : 8 * index + 8]
        assert set(tube_faces.ravel().tolist()) == set(range(8 * index, 8 * index + 8))
        start, end = vertices[8 * index : 8 * index + 4].mean(axis=0), vertices[8 * index + 4 : 8 * index + 8].mean(0)
        axis = (end - start) / np.linalg.norm(end - start)
        corners = vertices[tube_faces]
        normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        np.testing.assert_allclose(0.5 * np.linalg.norm(normals, axis=1).sum(), 4 * width * np.linalg.norm(end - start))
        centroids = corners.mean(axis=1)
        radial = (centroids - start) - np.outer((centroids - start) @ axis, axis)
        np.testing.assert_allclose(normals @ axis, 0.0, atol=1e-12)
        assert (np.einsum("ij,ij->i", normals, radial) > 0).all()


def test_view_colours_are_hsv_colours_with_hues_a_golden_ratio_apart():
    """View i's colour is HSV(i * 0.618... mod 1, saturation 0.85, value 0.95), computed here with `colorsys`."""
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    expected = [
        np.rint(np.array(colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, 0.95)) * 255).astype(int) for i in range(20)
    ]
    np.testing.assert_array_equal(glb.view_colours(20).astype(int), expected)


def test_scene_scale_measures_from_each_camera_centre():
    """Points clustered 2 away from a camera at (10, 0, 0): the scale is 2, whatever the points' distance to the
    origin (0.25 for a small cluster); all points on the camera gives the documented fallback 1.0."""
    poses = np.eye(4)[None].copy()
    poses[0, :3, 3] = [10.0, 0.0, 0.0]
    assert glb.robust_scene_scale(sphere(2.0, centre=(10.0, 0.0, 0.0)), poses) == pytest.approx(2.0)
    assert glb.robust_scene_scale(sphere(0.25, centre=(10.0, 0.0, 0.0)), poses) == pytest.approx(0.25)
    assert glb.robust_scene_scale(np.tile([[10.0, 0.0, 0.0]], (5, 1)), poses) == 1.0


def test_scene_scale_of_a_large_cloud_samples_all_of_it():
    """30,000 points (over the 20,000 sample): 9,000 at distance 5, then 12,000 at 1, then 9,000 at 5. The whole
    cloud, and a sample spread over it, is 60% at 5: scale 5. The first 20,000 points alone (11,000 at 1 of them) or
    the last 20,000 would give 1."""
    radii = np.repeat([5.0, 1.0, 5.0], [9_000, 12_000, 9_000])
    points = sphere(1.0, count=30_000) * radii[:, None]
    assert np.median(radii[:20_000]) == np.median(radii[-20_000:]) == 1.0  # what a prefix or suffix sample would see
    assert glb.robust_scene_scale(points, np.eye(4)[None]) == pytest.approx(5.0)


def test_scene_scale_of_a_single_point_and_of_no_finite_point():
    """One finite point is enough; a cloud without any finite point is refused."""
    points = np.array([[np.nan, 0.0, 0.0], [0.0, 3.0, 4.0]])
    assert glb.robust_scene_scale(points, np.eye(4)[None]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no finite point"):
        glb.robust_scene_scale(np.full((3, 3), np.nan), np.eye(4)[None])


def test_frustums_are_square_without_an_image_size(tmp_path):
    """`image_size=None` draws square frustums (base as wide as tall), written and read back through the GLB."""
    points = sphere(10.0).astype(np.float32)
    path = glb.save_scene_glb(tmp_path / "s.glb", points, np.zeros((len(points), 3), np.uint8), np.eye(4)[None])
    vertices = np.asarray(trimesh.load(path).geometry["camera_0"].vertices)
    tube = 2 * 0.04 * 1.5  # the edges' tubes (half-diagonal 0.04 * 1.5 / sqrt 2 each side) widen each extent
    assert np.ptp(vertices[:, 0]) == pytest.approx(1.5, abs=tube)
    assert np.ptp(vertices[:, 1]) == pytest.approx(1.5, abs=tube)
    assert vertices[:, 2].max() == pytest.approx(1.5, abs=tube)


# ------------------------------------------------------------------------------------------------------------- PLY


def test_ply_stores_float32_positions_and_rgba_bytes(tmp_path):
    """The header declares float x/y/z and uchar red/green/blue/alpha; float64 points come back as their float32
    values, the colours exactly, alpha opaque."""
    from g2vlm_hf.export.ply import save_point_cloud_ply

    points = np.array([[0.1, -2.5, 1e-3], [123.456789, 0.0, -7.0]], dtype=np.float64)
    colours = np.array([[0, 128, 255], [7, 8, 9]], dtype=np.uint8)
    path = save_point_cloud_ply(tmp_path / "c.ply", points, colours)
    header = path.read_bytes().split(b"end_header")[0].decode()
    assert "element vertex 2" in header
    properties = [line.split()[1:] for line in header.splitlines() if line.startswith("property")]
    assert properties == [["float", "x"], ["float", "y"], ["float", "z"]] + [
        ["uchar", name] for name in ("red", "green", "blue", "alpha")
    ]
    cloud = trimesh.load(path)
    np.testing.assert_array_equal(np.asarray(cloud.vertices), points.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(np.asarray(cloud.colors), np.c_[colours, np.full(2, 255)])
