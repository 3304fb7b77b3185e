"""Behaviour of the reconstruction losses that no other test pinned (found by mutation testing).

The scenes are tiny and built so that every expected value follows by hand from what the losses are: targets in the
first camera's frame normalised by their mean point distance, predictions by their own, one weighted-L1 scale
aligning the predicted local points (weights 1 / depth, the depth floored at 0.1 x its view's mean depth), a Huber
(delta 0.1) on the relative camera translations and the mean geodesic angle of the relative rotations."""

from __future__ import annotations

import math

import pytest
import torch

from g2vlm_hf.modeling.geometry_losses import (
    G2VLMGeometryLossWeights,
    geometry_losses,
    mean_distance,
    relative_poses,
    rotation_angle,
    scale_translations,
    weighted_l1_scale,
)

K = 3.0  # the prediction's own (unknown) scale
CENTRES = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.2, 0.0]])  # both cameras look along +z (identity rotations)
FAR, NEAR = 4.0, 0.2  # depths: five points on the plane z = 4 and one near point in each view
ROT_FLOOR = math.acos(1 - 1e-6)  # angle of identical rotations: cosine clamped to 1 - 1e-6 (float32: within 1%)


def rotation_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def rotation_x(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


def scene(extra_pixels: bool = True) -> dict:
    """One scene of two 2x4 views. Pixels 0-5 of each view are known and in front of both cameras (5 at depth 4, the
    last at depth 0.2); with `extra_pixels`, pixel 6 is masked out (and holds a far point) and pixel 7 is marked
    valid but lies behind both cameras. Without them, pixels 6 and 7 are masked out."""
    views = [
        [(-1, -1, FAR), (0, -1, FAR), (1, -1, FAR), (-1, 1, FAR), (0, 1, FAR), (0.1, 0.1, NEAR)],
        [(-0.5, -0.8, FAR), (0.5, -0.8, FAR), (1.5, -0.8, FAR), (-0.5, 1.2, FAR), (0.5, 1.2, FAR), (0.6, 0.3, NEAR)],
    ]
    world = torch.tensor([[*v, (50.0, -20.0, 9.0), (0.3, 0.4, -2.0)] for v in views], dtype=torch.float64)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[:, 6] = False
    if not extra_pixels:
        valid[:, 7] = False
    poses = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    poses[:, :3, 3] = CENTRES.double()
    local = world - CENTRES.double()[:, None]
    return {
        "world": world.view(1, 2, 2, 4, 3),
        "valid": valid.view(1, 2, 2, 4),
        "poses": poses[None],
        "local": local.view(1, 2, 2, 4, 3),
        "known": valid.clone().view(1, 2, 2, 4) & (local[..., 2] > 0).view(1, 2, 2, 4),
    }


def exact_prediction(s: dict) -> dict:
    """The truth at scale K, with garbage where the target is unknown or behind the camera (it must not count)."""
    local, world = K * s["local"].clone(), K * s["world"].clone()
    unknown = ~s["known"]
    local[unknown] = torch.tensor([7.0, -9.0, 0.5], dtype=torch.float64)
    world[unknown] = torch.tensor([-8.0, 6.0, 30.0], dtype=torch.float64)
    poses = s["poses"].clone()
    poses[..., :3, 3] *= K
    return {"local_points": local, "global_points": world, "camera_poses": poses}


def weight_of_depth(depth: float) -> float:
    """Per-pixel weight in world units (the normalisation scales depth and error alike): 1 / depth, the depth floored
    at 0.1 x the mean depth of its view's known points (5 at FAR and one at NEAR)."""
    return 1.0 / max(depth, 0.1 * (5 * FAR + NEAR) / 6)


def losses_of(s: dict, prediction: dict, weights: G2VLMGeometryLossWeights | None = None) -> dict:
    return geometry_losses(prediction, s["world"], s["valid"], s["poses"], weights)


def test_an_exact_prediction_at_another_scale_costs_nothing_whatever_the_unknown_pixels_hold():
    """Masked pixels and valid pixels behind their camera hold garbage in the prediction: they are left out."""
    s = scene()
    losses = losses_of(s, exact_prediction(s))
    for name in ("local_points", "global_points", "camera_translation"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6), name
    assert losses["camera_rotation"].item() == pytest.approx(ROT_FLOOR, rel=2e-2)


def test_a_known_point_at_depth_zero_is_left_out_like_one_behind_the_camera():
    """A point on the first camera's plane (depth exactly 0) is no pixel's depth: marked valid and predicted wrong,
    it changes no loss term."""
    s = scene()
    s["world"][0, 0, 1, 3] = torch.tensor([0.7, -0.2, 0.0], dtype=torch.float64)  # view 0, pixel 7: depth 0
    s["local"][0, 0, 1, 3] = s["world"][0, 0, 1, 3]
    prediction = exact_prediction(s)
    prediction["local_points"][0, 1, 1, 1, 0] += 0.6
    reference = losses_of(s, prediction)
    prediction["local_points"][0, 0, 1, 3] = torch.tensor([-5.0, 4.0, 3.0], dtype=torch.float64)
    prediction["global_points"][0, 0, 1, 3] = torch.tensor([5.0, -4.0, 3.0], dtype=torch.float64)
    for name, value in losses_of(s, prediction).items():
        torch.testing.assert_close(value, reference[name], msg=name)


def test_local_point_loss_is_the_depth_weighted_l1_error_after_scale_alignment():
    """Two coordinates off by known amounts: the optimal scale still maps the other 34 onto the truth, and the loss
    is the mean over the 12 known pixels' 36 coordinates of |error| / (K * floored depth)."""
    s = scene()
    prediction = exact_prediction(s)
    prediction["local_points"][0, 1, 1, 1, 0] += 0.6  # view 1, pixel 5 (the near one), x
    prediction["local_points"][0, 0, 0, 2, 1] -= 0.9  # view 0, pixel 2 (depth 4), y
    expected = (0.6 * weight_of_depth(NEAR) + 0.9 * weight_of_depth(FAR)) / K / 36
    losses = losses_of(s, prediction)
    assert losses["local_points"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["global_points"].item() == pytest.approx(0.0, abs=1e-6)


def test_global_point_loss_uses_the_local_alignment_and_the_same_weights():
    """Global points off at two pixels: divided by the prediction's local mean distance and multiplied by the local
    points' scale, their error is |error| / (K * floored depth), averaged over the 36 known coordinates."""
    s = scene()
    prediction = exact_prediction(s)
    prediction["global_points"][0, 0, 1, 1, 2] += 1.2  # view 0, pixel 5 (near), z
    prediction["global_points"][0, 1, 0, 0, 0] -= 0.3  # view 1, pixel 0 (depth 4), x
    expected = (1.2 * weight_of_depth(NEAR) + 0.3 * weight_of_depth(FAR)) / K / 36
    losses = losses_of(s, prediction)
    assert losses["global_points"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["local_points"].item() == pytest.approx(0.0, abs=1e-6)


def huber(error: float, delta: float = 0.1) -> float:
    error = abs(error)
    return 0.5 * error**2 if error <= delta else delta * (error - 0.5 * delta)


def test_camera_translation_loss_is_a_huber_of_the_normalised_relative_translations():
    """The second camera off by (0.3, 0.05, 0) in the normalised target frame: both ordered pairs' relative
    translations are off by that vector (one each way), the Huber (delta 0.1) is linear in 0.3, quadratic in 0.05,
    and averaged over the 2 x 3 coordinates. The whole prediction may live in another frame (a rigid move)."""
    s = scene(extra_pixels=False)
    known = s["world"][s["valid"]]
    target_scale = float(known.norm(dim=-1).mean())  # mean distance from the first camera (the world origin)
    prediction = exact_prediction(s)
    prediction["camera_poses"][0, 1, :3, 3] += torch.tensor([0.3, 0.05, 0.0], dtype=torch.float64) * K * target_scale
    move = torch.eye(4, dtype=torch.float64)
    move[:3, :3], move[:3, 3] = rotation_x(0.4) @ rotation_z(-1.1), torch.tensor([2.0, -1.0, 0.5])
    prediction["camera_poses"] = move @ prediction["camera_poses"]
    losses = losses_of(s, prediction)
    expected = 2 * (huber(0.3) + huber(0.05)) / 6
    assert losses["camera_translation"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["camera_rotation"].item() == pytest.approx(ROT_FLOOR, rel=2e-2)
    assert losses["camera"].item() == pytest.approx(100.0 * expected + ROT_FLOOR, rel=1e-4)


def test_camera_rotation_loss_is_the_mean_geodesic_angle_of_the_relative_rotations():
    """The second camera turned by 0.5 rad about its axis: both ordered pairs' relative rotations are off by 0.5."""
    s = scene()
    prediction = exact_prediction(s)
    prediction["camera_poses"][0, 1, :3, :3] = rotation_z(0.5)
    assert losses_of(s, prediction)["camera_rotation"].item() == pytest.approx(0.5, rel=1e-4)


def test_confidence_learns_which_aligned_local_points_lie_within_the_threshold():
    """Two pixels off: one by a mean aligned error (over x, y, z) of 0.03, over the threshold (0.02), labelled 0;
    one by 0.01 (0.03 summed over x, y, z), under it, labelled 1 like the 10 exact ones. The loss is the mean binary
    cross-entropy of the logits (here all 2) over the 12 known pixels."""
    s = scene()
    prediction = exact_prediction(s)
    # the mean over x, y, z of the weighted error of a pixel at depth 4 off in x by e: e * weight / K / 3
    prediction["local_points"][0, 0, 0, 0, 0] += 0.03 * 3 * K / weight_of_depth(FAR)  # view 0, pixel 0
    prediction["local_points"][0, 1, 0, 1, 0] += 0.01 * 3 * K / weight_of_depth(FAR)  # view 1, pixel 1
    prediction["confidence"] = torch.full((1, 2, 2, 4), 2.0, dtype=torch.float64)
    prediction["confidence"][~s["known"]] = -50.0  # unknown pixels take no part
    losses = losses_of(s, prediction)
    softplus = lambda x: math.log1p(math.exp(x))
    expected = (11 * softplus(-2.0) + softplus(2.0)) / 12  # BCE of logit l: label 1 -> softplus(-l), 0 -> softplus(l)
    assert losses["confidence"].item() == pytest.approx(expected, rel=1e-5)


def test_a_single_view_has_no_camera_term():
    """One view has no pair of cameras: the camera terms are absent (not NaN) and the total is the point terms'."""
    s = {name: value[:, :1] for name, value in scene().items()}
    prediction = {name: value[:, :1] for name, value in all_terms(scene()).items()}
    prediction["local_points"][0, 0, 0, 2, 1] -= 0.9
    losses = losses_of(s, prediction)
    assert sorted(losses) == ["confidence", "global_points", "local_points", "total"]
    total = losses["local_points"] + 0.05 * losses["confidence"] + losses["global_points"]
    torch.testing.assert_close(losses["total"], total)
    assert losses["local_points"].item() > 1e-3


def test_one_known_pixel_is_enough_and_none_or_only_pixels_behind_the_cameras_are_refused():
    s = scene(extra_pixels=False)
    one = torch.zeros_like(s["valid"])
    one[0, 0, 0, 0] = True
    losses = geometry_losses(exact_prediction(s), s["world"], one, s["poses"])
    assert all(bool(value.isfinite()) for value in losses.values())
    assert losses["local_points"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="marks no valid pixel"):
        geometry_losses(exact_prediction(s), s["world"], torch.zeros_like(s["valid"]), s["poses"])
    behind = torch.zeros_like(s["valid"])
    behind[..., 1, 3] = True  # pixel 7 of each view: behind both cameras
    with pytest.raises(ValueError, match="No valid target point lies in front of its camera"):
        geometry_losses(exact_prediction(s), s["world"], behind, s["poses"])


def test_an_all_zero_local_prediction_costs_the_weighted_mean_distance_of_the_targets():
    """Nothing to align (every ratio target / prediction undefined): the local loss is the mean over the 36 known
    coordinates of |target coordinate| / floored depth (in world units: the normalisation cancels), and finite."""
    s = scene()
    prediction = exact_prediction(s)
    prediction["local_points"] = torch.zeros_like(prediction["local_points"])
    known = s["local"][s["known"]]
    depth = torch.tensor([weight_of_depth(float(z)) for z in known[:, 2]], dtype=torch.float64)
    expected = float((known.abs().sum(-1) * depth).sum()) / 36
    losses = losses_of(s, prediction)
    assert losses["local_points"].item() == pytest.approx(expected, rel=1e-4)


def all_terms(s: dict) -> dict:
    prediction = exact_prediction(s)
    prediction["local_points"][0, 1, 0, 1, 0] += 0.5
    prediction["global_points"][0, 0, 1, 0, 1] += 0.7
    prediction["camera_poses"][0, 1, :3, :3] = rotation_z(0.3)
    prediction["camera_poses"][0, 1, :3, 3] += torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
    prediction["confidence"] = torch.linspace(-2, 2, 16, dtype=torch.float64).view(1, 2, 2, 4)
    return prediction


def test_each_weight_scales_exactly_its_named_term():
    """total = w_local L_local + w_conf L_conf + w_global L_global + w_camera (w_translation L_translation + L_rotation),
    with every term nonzero and every weight distinct; the terms themselves do not depend on the weights."""
    s = scene()
    weights = G2VLMGeometryLossWeights(
        local_points=1.5, global_points=0.7, camera=0.3, camera_translation=40.0, confidence=0.11
    )
    losses = losses_of(s, all_terms(s), weights)
    plain = losses_of(s, all_terms(s), G2VLMGeometryLossWeights(1.0, 1.0, 1.0, 1.0, 1.0))
    for name in ("local_points", "global_points", "camera_translation", "camera_rotation", "confidence"):
        assert losses[name].item() > 1e-4, name
        torch.testing.assert_close(losses[name], plain[name])
    camera = 40.0 * losses["camera_translation"] + losses["camera_rotation"]
    torch.testing.assert_close(losses["camera"], camera)
    total = 1.5 * losses["local_points"] + 0.11 * losses["confidence"] + 0.7 * losses["global_points"] + 0.3 * camera
    torch.testing.assert_close(losses["total"], total)


def test_default_weights_are_the_official_recipe():
    """Without weights: local 1, global 1, camera 0.2 with translation 100 inside it, confidence 0.05 (threshold
    0.02), as the module documents for the official recipe."""
    s = scene()
    losses = losses_of(s, all_terms(s))
    camera = 100.0 * losses["camera_translation"] + losses["camera_rotation"]
    torch.testing.assert_close(losses["camera"], camera)
    total = losses["local_points"] + 0.05 * losses["confidence"] + losses["global_points"] + 0.2 * camera
    torch.testing.assert_close(losses["total"], total)
    assert G2VLMGeometryLossWeights().confidence_threshold == 0.02


# ------------------------------------------------------------------------------------------ the helpers


def test_weighted_l1_scale_minimises_the_weighted_l1_error_and_takes_no_gradient():
    """The scale is a minimiser of sum_i w_i sum_c |a x_ic - y_ic| (checked against every candidate ratio y / x, where
    the minimum of this piecewise-linear function lies); coordinates with x = 0 do not depend on a. No gradient flows
    through it (the scale is a constant of the loss)."""
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(40, 3, generator=generator, dtype=torch.float64) * 4 - 2
    source[3, 1] = 0.0
    target = source * (torch.rand(40, 3, generator=generator, dtype=torch.float64) * 2 + 0.5)
    weight = torch.rand(40, generator=generator, dtype=torch.float64) ** 3
    cost = lambda a: float((weight[:, None] * (a * source - target).abs()).sum())
    keep = source != 0
    candidates = (target[keep] / source[keep]).tolist()
    found = weighted_l1_scale(source.clone().requires_grad_(True), target, weight)
    assert not found.requires_grad
    assert cost(float(found)) == pytest.approx(min(cost(a) for a in candidates), rel=1e-12)
    assert cost(float(found)) < cost(float(found) * 1.01) and cost(float(found)) < cost(float(found) * 0.99)
    # ratios 1, 2, 3 thrice, equally weighted: the middle one; then the largest ratio (9) on a coordinate 100 times
    # larger, which outweighs the other eight together: that one
    source, target = torch.ones(3, 3, dtype=torch.float64), torch.tensor([[1.0, 2.0, 3.0]] * 3, dtype=torch.float64)
    weight = torch.ones(3, dtype=torch.float64)
    assert float(weighted_l1_scale(source, target, weight)) == 2.0
    source[2, 2], target[2, 2] = 100.0, 900.0
    assert float(weighted_l1_scale(source, target, weight)) == 9.0


def test_rotation_angle_is_the_geodesic_angle():
    """The angle between rotations about one axis is the difference of their angles; a batch keeps its shape."""
    rotations = torch.stack([rotation_z(0.2), rotation_x(1.0), rotation_z(-0.4)])
    targets = torch.stack([rotation_z(0.9), rotation_x(-0.5), rotation_z(2.1)])
    torch.testing.assert_close(rotation_angle(rotations, targets), torch.tensor([0.7, 1.5, 2.5], dtype=torch.float64))


def test_rotation_angle_of_equal_or_opposite_rotations_is_clamped_and_keeps_finite_gradients():
    """acos of a cosine clamped to [-1 + 1e-6, 1 - 1e-6] (as officially): no NaN from rounding past +-1 and no
    infinite gradient at 0 or pi."""
    rotations = torch.stack([rotation_z(0.7), rotation_x(0.3)]).requires_grad_(True)
    targets = torch.stack([rotation_z(0.7), rotation_x(0.3 + math.pi)])
    angles = rotation_angle(rotations, targets)
    expected = torch.tensor([math.acos(1 - 1e-6), math.acos(-1 + 1e-6)], dtype=torch.float64)
    torch.testing.assert_close(angles, expected)
    angles.sum().backward()
    assert bool(rotations.grad.isfinite().all())


def test_relative_poses_are_every_ordered_pair_of_distinct_views_row_by_row():
    generator = torch.Generator().manual_seed(1)
    poses = torch.eye(4, dtype=torch.float64).repeat(1, 3, 1, 1)
    for view, matrix in enumerate([rotation_z(0.3), rotation_x(-0.8), rotation_z(1.7) @ rotation_x(0.2)]):
        poses[0, view, :3, :3] = matrix
        poses[0, view, :3, 3] = torch.randn(3, generator=generator, dtype=torch.float64)
    pairs = relative_poses(poses)
    expected = [torch.linalg.inv(poses[0, i]) @ poses[0, j] for i in range(3) for j in range(3) if i != j]
    assert pairs.shape == (1, 6, 4, 4)
    torch.testing.assert_close(pairs[0], torch.stack(expected))


def test_mean_distance_counts_only_the_valid_points_and_an_empty_scene_is_zero():
    points = torch.tensor(
        [[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [100.0, 0.0, 0.0]], [[0.0, 6.0, 8.0], [50.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]
    )
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(mean_distance(points, mask), torch.tensor([3.5, 10.0]))
    torch.testing.assert_close(mean_distance(points, torch.zeros_like(mask)), torch.tensor([0.0, 0.0]))


def test_scale_translations_scales_the_translations_alone():
    poses = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1, 1)
    poses[..., :3, :3] = rotation_x(0.6)
    poses[..., :3, 3] = torch.tensor([1.0, -2.0, 3.0])
    scaled = scale_translations(poses, torch.tensor([2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(scaled[..., :3, :3], poses[..., :3, :3])
    torch.testing.assert_close(scaled[0, :, :3, 3], 2.0 * poses[0, :, :3, 3])
    torch.testing.assert_close(scaled[1, :, :3, 3], 0.5 * poses[1, :, :3, 3])
    torch.testing.assert_close(scaled[..., 3, :], poses[..., 3, :])
