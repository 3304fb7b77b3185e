"""Behaviour of the similarity transforms and their fits that no other test pinned (found by mutation testing).

Expected values are derived by hand or with NumPy, independently of `g2vlm_hf.similarity`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g2vlm_hf.similarity import Similarity, robust_umeyama, umeyama, weighted_median


def rotation(rng: np.random.Generator) -> np.ndarray:
    """A random proper rotation (QR of a Gaussian matrix, signs fixed so that det = +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def known(rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray]:
    return float(rng.uniform(0.3, 4.0)), rotation(rng), rng.normal(0, 5, 3)


def moved(parts: tuple[float, np.ndarray, np.ndarray], points: np.ndarray) -> np.ndarray:
    scale, rot, shift = parts
    return scale * points @ rot.T + shift


# ------------------------------------------------------------------------------------------ the Similarity class


def test_identity_leaves_points_unchanged():
    """`Similarity.identity()` maps every point onto itself (scale 1, no rotation, no shift)."""
    points = torch.from_numpy(np.random.default_rng(0).normal(size=(7, 3)))
    identity = Similarity.identity()
    torch.testing.assert_close(identity.apply(points), points, rtol=0, atol=0)
    assert identity.scale == 1.0


def test_compose_applies_the_inner_similarity_first_and_inverse_undoes():
    """`a.compose(b)(x) == a(b(x))` and `a.inverse()(a(x)) == x` for general similarities (rotation and shift)."""
    rng = np.random.default_rng(1)
    outer, inner = known(rng), known(rng)
    a, b = Similarity(*outer), Similarity(*inner)
    points = rng.normal(size=(20, 3))
    expected = moved(outer, moved(inner, points))
    torch.testing.assert_close(a.compose(b).apply(torch.from_numpy(points)), torch.from_numpy(expected))
    torch.testing.assert_close(a.inverse().apply(torch.from_numpy(moved(outer, points))), torch.from_numpy(points))
    back = a.compose(a.inverse())
    assert back.scale == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(back.rotation, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(back.translation, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_apply_to_poses_moves_cameras_consistently_with_their_points():
    """`new pose @ (scale * local) == similarity(pose @ local)`, the bottom row stays (0, 0, 0, 1), the input is
    left untouched."""
    rng = np.random.default_rng(3)
    parts = known(rng)
    poses = np.tile(np.eye(4), (4, 1, 1))
    for pose in poses:
        pose[:3, :3], pose[:3, 3] = rotation(rng), rng.normal(size=3)
    local = rng.normal(size=(4, 10, 3))
    world = np.einsum("vij,vpj->vpi", poses[:, :3, :3], local) + poses[:, None, :3, 3]
    given = torch.from_numpy(poses.copy())
    new = Similarity(*parts).apply_to_poses(given).numpy()
    scaled = parts[0] * local
    np.testing.assert_allclose(
        np.einsum("vij,vpj->vpi", new[:, :3, :3], scaled) + new[:, None, :3, 3], moved(parts, world), atol=1e-10
    )
    np.testing.assert_array_equal(new[:, 3], np.tile([0.0, 0.0, 0.0, 1.0], (4, 1)))
    np.testing.assert_array_equal(given.numpy(), poses)


def test_points_given_as_a_reversed_view_or_a_tensor_needing_grad_are_accepted():
    """A NumPy view with negative strides and a tensor that requires grad (e.g. a model's output) are valid input;
    the fit of the latter is plain data, outside the autograd graph (its tensors convert to NumPy)."""
    rng = np.random.default_rng(4)
    parts = known(rng)
    source = rng.normal(size=(10, 3))
    target = moved(parts, source)
    scale, rot, _ = umeyama(source[::-1], target[::-1])
    assert scale == pytest.approx(parts[0], rel=1e-10)
    np.testing.assert_allclose(rot.numpy(), parts[1], atol=1e-10)
    scale, rot, shift = umeyama(torch.from_numpy(source).requires_grad_(), torch.from_numpy(target))
    assert scale == pytest.approx(parts[0], rel=1e-10)
    assert not rot.requires_grad and not shift.requires_grad
    np.testing.assert_allclose(rot.numpy(), parts[1], atol=1e-10)
    np.testing.assert_allclose(shift.numpy(), parts[2], atol=1e-9)


# ------------------------------------------------------------------------------------------------------- umeyama


def test_umeyama_refuses_a_non_finite_target_point_of_positive_weight():
    """A NaN or Inf in the target alone (the source finite) is refused too."""
    source = np.random.default_rng(5).normal(size=(8, 3))
    target = source.copy()
    target[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf points of positive weight"):
        umeyama(source, target)


def test_umeyama_of_a_mirrored_cloud_is_the_best_proper_rotation():
    """Mirror images cannot be matched by a rotation: the fit keeps det +1 and flips the direction of least spread.

    Points +-3 e_x, +-2 e_y, +-1 e_z mirrored in z: the cross-covariance is diag(9, 4, -1) / 3, so the best rotation is
    the identity (a half turn about x would cost the larger y spread) and the scale (9 + 4 - 1) / (9 + 4 + 1) = 6/7."""
    axes = np.diag([3.0, 2.0, 1.0])
    source = np.concatenate([axes, -axes])
    target = source * np.array([1.0, 1.0, -1.0])
    scale, rot, shift = umeyama(source, target)
    assert scale == pytest.approx(6 / 7, rel=1e-12)
    np.testing.assert_allclose(rot.numpy(), np.eye(3), atol=1e-12)
    np.testing.assert_allclose(shift.numpy(), np.zeros(3), atol=1e-12)


def test_umeyama_without_scale_is_the_rigid_fit():
    """`with_scale=False`: points moved by a rotation and translation only give back that motion with scale 1; points
    also scaled by 2 about their centroid give the same rotation and the centroids matched."""
    rng = np.random.default_rng(6)
    _, rot, shift = known(rng)
    source = rng.normal(size=(30, 3))
    target = source @ rot.T + shift
    scale, fitted, translation = umeyama(source, target, with_scale=False)
    assert scale == 1.0
    np.testing.assert_allclose(fitted.numpy(), rot, atol=1e-12)
    np.testing.assert_allclose(translation.numpy(), shift, atol=1e-12)
    centre = target.mean(0)
    scale, fitted, translation = umeyama(source, 2 * (target - centre) + centre, with_scale=False)
    assert scale == 1.0
    np.testing.assert_allclose(fitted.numpy(), rot, atol=1e-12)
    np.testing.assert_allclose(source.mean(0) @ rot.T + translation.numpy(), centre, atol=1e-12)


def test_coinciding_points_are_judged_relative_to_their_distance_from_the_origin():
    """A cloud whose spread is 1e-12 of its distance from the origin (one point up to rounding) is refused, while a
    tiny cloud at the origin (spread 1e-12, as large as its distance from the origin) is fitted exactly."""
    rng = np.random.default_rng(7)
    parts = known(rng)
    noise = rng.normal(size=(20, 3))
    with pytest.raises(ValueError, match="all coincide"):
        umeyama(np.array([1e3, 2e3, 3e3]) + 1e-9 * noise, noise)
    tiny = 1e-12 * noise
    scale, rot, _ = umeyama(tiny, moved((parts[0], parts[1], np.zeros(3)), tiny))
    assert scale == pytest.approx(parts[0], rel=1e-9)
    np.testing.assert_allclose(rot.numpy(), parts[1], atol=1e-9)


# ------------------------------------------------------------------------------------------------ robust_umeyama


def scene_with_swapped_correspondences(seed: int, share: float, scale: float = 0.5):
    """Noise-free correspondences of a known similarity, `share` of them wrong matches inside the scene (the target
    of another point): moderate outliers the far-point filter cannot drop."""
    rng = np.random.default_rng(seed)
    parts = (scale, rotation(rng), rng.normal(0, 5, 3))
    source = rng.normal(size=(500, 3))
    target = moved(parts, source)
    wrong = int(share * 500)
    target[:wrong] = target[rng.permutation(np.arange(wrong, 500))[:wrong]]
    return parts, source, target


def test_the_robust_start_already_fits_the_inliers_exactly():
    """With `iterations=0` the result is the start: least median of squares over 3-point fits recovers a similarity
    (scale under 1) from noise-free inliers exactly, a fifth of wrong matches notwithstanding, where least squares is
    far off."""
    parts, source, target = scene_with_swapped_correspondences(10, 0.2)  # a rotation of 50 degrees (not symmetric)
    start = robust_umeyama(source, target, iterations=0)
    assert start.scale == pytest.approx(parts[0], rel=1e-9)
    np.testing.assert_allclose(start.rotation.numpy(), parts[1], atol=1e-9)
    np.testing.assert_allclose(start.translation.numpy(), parts[2], atol=1e-8)
    assert abs(umeyama(source, target)[0] - parts[0]) > 0.05


def test_without_outliers_the_start_is_least_squares():
    """Clean noisy correspondences: least squares has the lower median residual, so it is the start (`iterations=0`)."""
    rng = np.random.default_rng(9)
    parts = known(rng)
    source = rng.normal(size=(400, 3))
    target = moved(parts, source) + rng.normal(0, 0.05, (400, 3))
    start = robust_umeyama(source, target, iterations=0)
    scale, rot, shift = umeyama(source, target)
    assert start.scale == pytest.approx(scale, rel=1e-12)
    torch.testing.assert_close(start.rotation, rot)
    torch.testing.assert_close(start.translation, shift)


def test_tolerance_is_relative_to_the_target_extent():
    """The refits stop once the fitted points move by at most `tolerance` times the target's extent: with a target of
    extent about 100 and `tolerance=0.05` (5 units, far more than a refit moves them) one refit is made; with 0 all
    `iterations` are."""
    rng = np.random.default_rng(10)
    parts = (20.0, rotation(rng), rng.normal(0, 5, 3))
    source = rng.normal(size=(600, 3))
    target = moved(parts, source) + rng.normal(0, 0.5, (600, 3))
    target[:120] += rng.normal(0, 15, (120, 3))
    points = torch.from_numpy(source)
    one = robust_umeyama(source, target, iterations=1).apply(points)
    loose = robust_umeyama(source, target, tolerance=0.05).apply(points)
    many = robust_umeyama(source, target, iterations=30, tolerance=0.0).apply(points)
    torch.testing.assert_close(loose, one, rtol=0, atol=1e-12)
    assert float((many - one).abs().max()) > 1e-9


def test_three_source_points_on_one_spot_holding_half_the_weight_are_refused():
    """Half or more of the weight on one point: refused when three or more correspondences sit there (invalid pixels),
    kept when that is a single heavily weighted correspondence."""
    rng = np.random.default_rng(11)
    parts = known(rng)
    source = rng.normal(size=(5, 3))
    source[:3] = 0.0
    with pytest.raises(ValueError, match="Half or more of the source points"):
        robust_umeyama(source, moved(parts, rng.normal(size=(5, 3))))
    source = rng.normal(size=(7, 3))
    target = moved(parts, source)
    fit = robust_umeyama(source, target, np.array([10.0, 1, 1, 1, 1, 1, 1]))
    assert fit.scale == pytest.approx(parts[0], rel=1e-9)
    np.testing.assert_allclose(fit.rotation.numpy(), parts[1], atol=1e-9)


def test_weighted_median_follows_the_weights():
    """A value carrying more than half the weight is the median, wherever it sits in the order; equal weights give
    the middle value; columns are independent."""
    values = torch.tensor([[1.0, 10.0], [2.0, 3.0], [3.0, 2.0], [10.0, 1.0]], dtype=torch.float64)
    heavy_last = torch.tensor([1.0, 1.0, 1.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(weighted_median(values, heavy_last), torch.tensor([10.0, 1.0], dtype=torch.float64))
    odd = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0], dtype=torch.float64)
    assert float(weighted_median(odd, torch.ones(5, dtype=torch.float64))) == 3.0


@pytest.mark.parametrize(
    ("extent", "offset"), [(0.01, (0.0, 0.0, 0.0)), (1.0, (1e3, -5e2, 2e2))], ids=["small-scene", "off-origin"]
)
def test_points_beyond_ten_median_distances_take_no_part(extent, offset):
    """Correspondences whose source point lies 10.5 median distances from the cloud's median (median and distances
    computed here with NumPy) are dropped: the fit is the one without them, bit for bit, in a scene smaller than one
    unit and in one far from the origin. At 9.5 median distances they are kept, and move the noisy fit."""
    rng = np.random.default_rng(13)
    parts = known(rng)
    bulk = np.asarray(offset) + extent * rng.normal(size=(901, 3))
    directions = rng.normal(size=(60, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    noise = extent * 1e-3 * rng.normal(size=(961, 3))

    def with_far_points(ratio: float) -> tuple[np.ndarray, np.ndarray]:
        far = np.median(bulk, axis=0) + 12 * extent * directions  # placed once to fix the coordinates' order
        for _ in range(3):  # the median and the median distance of the whole cloud, far points included
            cloud = np.concatenate([bulk, far])
            median = np.median(cloud, axis=0)
            typical = np.median(np.linalg.norm(cloud - median, axis=1))
            far = median + ratio * typical * directions
        cloud = np.concatenate([bulk, far])
        median = np.median(cloud, axis=0)
        ratios = np.linalg.norm(far - median, axis=1) / np.median(np.linalg.norm(cloud - median, axis=1))
        assert np.allclose(ratios, ratio, rtol=1e-3)
        return cloud, moved(parts, cloud) + noise

    source, target = with_far_points(10.5)
    points = torch.from_numpy(source[:901])
    alone = robust_umeyama(source[:901], target[:901]).apply(points)
    torch.testing.assert_close(robust_umeyama(source, target).apply(points), alone, rtol=0, atol=1e-12 * extent)
    source, target = with_far_points(9.5)
    assert float((robust_umeyama(source, target).apply(points) - alone).abs().max()) > 1e-9 * extent
