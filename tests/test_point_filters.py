"""Point filters without a confidence head (`g2vlm_hf.point_filters`), on small hand-built reconstructions."""

from __future__ import annotations

import numpy as np
import pytest

from g2vlm_hf.point_filters import PointSelection, background, depth_edges, keep_mask, percentile_box, select_points


def plane_scene(num_views: int = 2, size: int = 20, seed: int = 0):
    """Points on a unit square at depth 1 (plus noise), grey pixels, and depth 1 everywhere."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    grid = np.stack([xs, ys, np.ones_like(xs)], axis=-1)
    points = np.repeat(grid[None], num_views, axis=0) + 0.001 * rng.standard_normal((num_views, size, size, 3))
    images = np.full((num_views, size, size, 3), 128, dtype=np.uint8)
    depth = np.ones((num_views, size, size))
    return points, images, depth


def test_percentile_box_ignores_far_outliers():
    points, _, _ = plane_scene()
    points[0, 0, 0] = [1e4, -1e4, 1e4]  # one point 10,000 units away sets the bounding box, not the percentile box
    low, high = percentile_box(points, 1.0)
    assert np.all(high - low < 1.1) and np.all(low > -0.1)
    keep = keep_mask(points, *plane_scene()[1:], None, PointSelection(outlier_percentile=1.0))
    assert not keep[0, 0, 0]
    with pytest.raises(ValueError, match="percentile"):
        percentile_box(points, 50)


def test_depth_edges_mark_both_sides_of_a_jump_only():
    depth = np.ones((1, 6, 6))
    depth[0, :, 3:] = 3.0  # a wall behind at columns 3..5
    edges = depth_edges(depth, 0.1)
    assert edges[0, :, 2].all() and edges[0, :, 3].all()
    assert not edges[0, :, [0, 1, 4, 5]].any()
    assert not depth_edges(depth, 5.0).any()  # a jump of 2 (x1 or x3 of the depth) is under 5x the depth


def test_background_masks_black_and_white_pixels():
    images = np.array([[[[0, 5, 3], [255, 250, 251], [128, 0, 255]]]], dtype=np.uint8)
    assert background(images, black=True, white=False).tolist() == [[[True, False, False]]]
    assert background(images, black=False, white=True).tolist() == [[[False, True, False]]]
    assert background(images, black=True, white=True).tolist() == [[[True, True, False]]]


def test_select_points_combines_filters_and_counts():
    points, images, depth = plane_scene(num_views=3, size=10)
    images[1, :5] = 0  # half of view 1 is black
    points[2, 0, 0] = np.nan
    everything = select_points(points, images, depth, None, PointSelection())
    assert everything[2] == len(everything[0]) == 3 * 100 - 1
    view_one = select_points(points, images, depth, None, PointSelection(views=[1], drop_black=True))
    assert view_one[2] == 50 and np.array_equal(view_one[0], points[1, 5:].reshape(-1, 3).astype(np.float32))
    sampled = select_points(points, images, depth, None, PointSelection(max_points=17))
    assert len(sampled[0]) == len(sampled[1]) == 17 and sampled[2] == 299
    depth[0, :, 6:] = 3.0  # a wall behind: columns 5 and 6 of view 0 are its edge, and nothing else is
    no_edges = select_points(points, images, depth, None, PointSelection(views=[0], depth_edge_jump=0.1))
    inside = np.ones((10, 10), dtype=bool)
    inside[:, 5:7] = False
    assert no_edges[2] == 80 and np.array_equal(no_edges[0], points[0][inside].astype(np.float32))
    confidence = np.arange(300, dtype=np.float64).reshape(3, 10, 10)
    confident = select_points(points, images, depth, confidence, PointSelection(confidence_percentile=50))
    assert confident[2] == 150
    with pytest.raises(ValueError, match="Every point is filtered away"):
        select_points(points, np.zeros_like(images), depth, None, PointSelection(drop_black=True))
    with pytest.raises(ValueError, match="whose confidence is NaN, are always left out"):  # no filter is on here
        select_points(points, images, depth, np.full(depth.shape, np.nan), PointSelection())


def test_a_nan_confidence_drops_its_point_only():
    """One NaN confidence must not make the percentile NaN (which would drop every point): the point is dropped,
    the others are ranked, and the page keeps what the export (`filter_points`) keeps."""
    from g2vlm_hf.export import filter_points

    points, images, depth = plane_scene(num_views=2, size=10)
    confidence = np.arange(200, dtype=np.float64).reshape(2, 10, 10)
    confidence[0, 3, 3] = np.nan
    for percentile in (0.0, 30.0):
        shown, colours, kept = select_points(
            points, images, depth, confidence, PointSelection(confidence_percentile=percentile, max_points=50)
        )
        exported, exported_colours = filter_points(
            points, images, confidence, confidence_percentile=percentile, max_points=50
        )
        assert kept == (199 if percentile == 0 else 139)
        assert np.array_equal(shown, exported) and np.array_equal(colours, exported_colours)


def test_the_cap_comes_after_the_filters_and_follows_them():
    """Filters first, then at most `max_points` of the points that pass: a filter that changes what passes changes
    what is drawn, even when both selections are over the cap."""
    points, images, depth = plane_scene(num_views=4, size=40)
    loose = select_points(points, images, depth, None, PointSelection(outlier_percentile=1.0, max_points=500))
    tight = select_points(points, images, depth, None, PointSelection(outlier_percentile=15.0, max_points=500))
    assert len(loose[0]) == len(tight[0]) == 500 and tight[2] < loose[2]
    assert not np.array_equal(loose[0], tight[0])
    low, high = percentile_box(points, 15.0)
    assert (tight[0] >= low.astype(np.float32) - 1e-6).all() and (tight[0] <= high.astype(np.float32) + 1e-6).all()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"confidence_percentile": 150.0}, r"`confidence_percentile` must be in \[0, 100\], got 150"),
        ({"confidence_percentile": -5.0}, r"`confidence_percentile` must be in \[0, 100\], got -5"),
        ({"outlier_percentile": 50.0}, r"`outlier_percentile` must be in \[0, 50\), got 50"),
        ({"depth_edge_jump": float("nan")}, "`depth_edge_jump` must be at least 0, got nan"),
        ({"max_points": 0}, "`max_points` must be at least 1, got 0"),
    ],
)
def test_a_selection_out_of_range_is_refused_naming_its_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        PointSelection(**settings)
    PointSelection(confidence_percentile=100.0, outlier_percentile=49.0)  # the edges are settings like any other
