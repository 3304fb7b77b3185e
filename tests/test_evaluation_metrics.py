"""Evaluation metrics on rendered scenes with exact geometry: perfect predictions score perfectly, known
perturbations give the analytically known values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from g2vlm_hf.evaluation import (
    adam_l1_scale_shift,
    depth_errors,
    evaluate_depth,
    evaluate_point_maps,
    evaluate_poses,
    extract_choice,
    find_scenes,
    grid_normals,
    knn_normals,
    l1_scale,
    least_squares_scale,
    least_squares_scale_shift,
    load_questions,
    mean_relative_accuracy,
    median_scale,
    nearest_neighbours,
    parse_number,
    point_cloud_metrics,
    pose_auc,
    relative_pose_errors,
    score_answer,
    summarize_vqa,
    umeyama,
    write_scene,
)
from g2vlm_hf.evaluation.points import icp_refine, k_nearest_with_distances
from g2vlm_hf.evaluation.poses import direction_angle_degrees, rotation_angle_degrees, summarize_pose_errors
from g2vlm_hf.training.synthetic import render_room, spatial_questions, yaw_pose


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


@pytest.fixture(scope="module")
def scene():
    poses = np.stack([yaw_pose(-0.4, -1.0, -12.0), yaw_pose(0.0, 0.0, 0.0), yaw_pose(0.7, 0.6, 20.0)])
    scene = render_room(poses, 18, 24)
    rotations, centres = poses[:, :3, :3], poses[:, :3, 3]
    local = np.einsum("nji,nhwj->nhwi", rotations, scene.world_points - centres[:, None, None])
    return scene, poses, local[..., 2]


# ---- depth -------------------------------------------------------------------------------------------------------


# What each alignment must undo: a scale, or for the shift alignments an affine map. Adam only approaches it: from
# the median ratio it moves each parameter by about its learning rate (1e-4) a step, so at most 0.1 in its 1000
# steps, and the shift it must find (up to 0.08 here) is within reach; the median ratio alone leaves abs_rel 3e-3.
UNDOES = {
    "median": (3.7, 0.0, 1e-9),
    "l1-scale": (3.7, 0.0, 1e-9),
    "lstsq-scale": (3.7, 0.0, 1e-9),
    "lstsq-scale-shift": (2.0, 0.5, 1e-9),
    "adam-l1-scale-shift": (0.5, 0.02, 5e-4),
}


@pytest.mark.parametrize("alignment", sorted(UNDOES))
@pytest.mark.parametrize("per_frame", [True, False])
def test_each_alignment_undoes_its_own_transform(scene, alignment, per_frame):
    _, _, depth = scene
    scale, shift, tolerance = UNDOES[alignment]
    # per frame, each frame gets its own factor; a sequence alignment sees one factor for all frames
    scales = scale * (np.array([1.0, 2.0, 0.5]) if per_frame else np.ones(3))[:, None, None]
    pred = scales * depth + shift
    metrics = evaluate_depth(pred, depth, alignment=alignment, per_frame=per_frame)
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=tolerance)
    assert metrics["delta_1.25"] == 1.0
    assert metrics["valid_pixels"] == depth.size
    assert evaluate_depth(pred, depth, alignment="none")["abs_rel"] > 0.4  # the alignment did the work


def test_without_alignment_a_known_offset_gives_known_errors(scene):
    _, _, depth = scene
    metrics = evaluate_depth(depth + 0.25, depth, alignment="none")
    assert metrics["rmse"] == pytest.approx(0.25)
    assert metrics["abs_rel"] == pytest.approx(np.mean(0.25 / depth))
    assert metrics["valid_pixels"] == depth.size


def test_scale_alignment_removes_a_global_scale(scene):
    _, _, depth = scene
    for alignment in ["median", "l1-scale", "lstsq-scale"]:
        metrics = evaluate_depth(3.7 * depth, depth, alignment=alignment, per_frame=False)
        assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["scale"] == pytest.approx(1 / 3.7)
        assert metrics["shift"] == pytest.approx(0.0, abs=1e-12)
    # Adam starts at the median ratio (here exact) and, normalising tiny gradients, wanders by about lr per step
    assert evaluate_depth(3.7 * depth, depth, alignment="adam-l1-scale-shift", per_frame=False)["abs_rel"] < 1e-3
    metric_depth = evaluate_depth(3.7 * depth, depth, alignment="none")
    assert metric_depth["abs_rel"] == pytest.approx(2.7)
    assert metric_depth["delta_1.25^3"] == 0.0  # 3.7 > 1.25^3 = 1.95


def test_scale_and_shift_alignment_recovers_an_affine_depth(scene):
    _, _, depth = scene
    scale, shift = least_squares_scale_shift(2 * depth + 0.5, depth)
    assert (scale, shift) == pytest.approx((0.5, -0.25))
    assert evaluate_depth(2 * depth + 0.5, depth, alignment="lstsq-scale-shift")["abs_rel"] == pytest.approx(
        0, abs=1e-9
    )


def test_known_relative_error_on_a_fraction_of_pixels(scene):
    _, _, depth = scene
    bad = np.zeros(depth.shape, dtype=bool)
    bad[:, ::3] = True  # one row in three
    pred = np.where(bad, 1.4 * depth, depth)
    metrics = evaluate_depth(pred, depth, alignment="none")
    assert metrics["abs_rel"] == pytest.approx(0.4 * bad.mean())
    assert metrics["delta_1.25"] == pytest.approx(1 - bad.mean())
    assert metrics["delta_1.25^2"] == 1.0
    # the L1 (IRLS, 10 steps) scale stays near the exact majority; the least-squares scale follows the outliers
    assert abs(l1_scale(pred, depth) - 1.0) < 0.01 < abs(least_squares_scale(pred, depth) - 1.0)


def test_per_frame_alignment_absorbs_per_frame_scales_a_sequence_alignment_does_not(scene):
    _, _, depth = scene
    pred = depth * np.array([1.0, 2.0, 4.0])[:, None, None]
    assert evaluate_depth(pred, depth, alignment="median", per_frame=True)["abs_rel"] == pytest.approx(0, abs=1e-9)
    sequence = evaluate_depth(pred, depth, alignment="l1-scale", per_frame=False)
    # the L1 scale settles on one frame's factor; the other two frames stay off by factors 2 and 4 (or 1/2, 1/4)
    assert sequence["abs_rel"] > 0.3


def test_depth_errors_by_their_definitions():
    """Each metric by hand on six pixels: differences 0, 1, -1.9, 1, 9, 61; ratios max(p/g, g/p) 1, 1.5, 4/2.1 and
    exactly 1.25, 1.25^2 and 1.25^3 (misses: the protocol counts ratio < 1.25^k)."""
    gt, pred = np.array([1.0, 2.0, 4.0, 4.0, 16.0, 64.0]), np.array([1.0, 3.0, 2.1, 5.0, 25.0, 125.0])
    errors = depth_errors(pred, gt)
    assert errors["abs_rel"] == pytest.approx((0 + 1 / 2 + 1.9 / 4 + 1 / 4 + 9 / 16 + 61 / 64) / 6)
    assert errors["sq_rel"] == pytest.approx((0 + 1 / 2 + 1.9**2 / 4 + 1 / 4 + 81 / 16 + 61**2 / 64) / 6)
    assert errors["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1.9**2 + 1 + 81 + 61**2) / 6))
    logs = [0.0, math.log(1.5), math.log(2.1 / 4), math.log(1.25), math.log(25 / 16), math.log(125 / 64)]
    assert errors["log_rmse"] == pytest.approx(math.sqrt(sum(v * v for v in logs) / 6))
    deltas = (errors["delta_1.25"], errors["delta_1.25^2"], errors["delta_1.25^3"])
    assert deltas == (pytest.approx(1 / 6), pytest.approx(3 / 6), pytest.approx(5 / 6))
    # a prediction of 0 counts as 1e-5 in the ratio and the logarithm (no infinity)
    zero = depth_errors(np.array([0.0]), np.array([1.0]))
    assert zero["log_rmse"] == pytest.approx(-math.log(1e-5)) and zero["delta_1.25^3"] == 0.0
    for bad in ((np.zeros(0), np.zeros(0)), (np.ones(3), np.ones(2))):
        with pytest.raises(ValueError, match="two non-empty arrays of one size"):
            depth_errors(*bad)


def test_depth_masks_invalid_and_far_ground_truth(scene):
    _, _, depth = scene
    gt = depth.copy()
    gt[0, 0, 0] = 0.0
    gt[1, 0, 0] = np.nan
    pred = np.where(depth > 3.0, 100.0, depth)  # wrong only where gt >= 3
    metrics = evaluate_depth(pred, gt, alignment="none", max_depth=3.0)
    assert metrics["abs_rel"] == pytest.approx(0.0)
    assert metrics["valid_pixels"] == int(((depth < 3.0) & (gt > 0)).sum())
    valid = np.zeros(depth.shape, dtype=bool)
    valid[0] = True
    assert evaluate_depth(2 * depth, depth, valid, alignment="none")["valid_pixels"] == depth[0].size


def test_depth_edges_of_the_valid_range_and_one_frame(scene):
    """Ground truth exactly at max_depth is out ("at or beyond"), below 1 is in; an (H, W) frame, with or without a
    mask, scores as the (1, H, W) sequence; frames are aligned one by one unless told otherwise."""
    _, _, depth = scene
    gt = depth[1] * 0.25  # depths below 1
    gt[0, 0], gt[0, 1] = 0.5, 2.0
    pred = gt * 1.1
    pred[0, 1] = 50.0  # wrong only where the ground truth is exactly max_depth
    metrics = evaluate_depth(pred, gt, alignment="none", max_depth=2.0)
    assert metrics["valid_pixels"] == int((gt < 2.0).sum()) == gt.size - 1
    assert metrics["abs_rel"] == pytest.approx(0.1)
    valid = np.ones(gt.shape, dtype=bool)
    valid[3:] = False
    for mask in (None, valid):
        assert evaluate_depth(pred, gt, mask) == evaluate_depth(
            pred[None], gt[None], None if mask is None else mask[None]
        )
    frames = np.stack([depth[0], depth[1]])
    scaled = frames * np.array([2.0, 5.0])[:, None, None]  # another scale per frame
    assert evaluate_depth(scaled, frames)["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert evaluate_depth(scaled, frames, per_frame=False)["abs_rel"] > 0.1


def test_depth_rejects_bad_input(scene):
    _, _, depth = scene
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_depth(depth[:, :-1], depth)
    with pytest.raises(ValueError, match="Unknown depth alignment"):
        evaluate_depth(depth, depth, alignment="mean")
    with pytest.raises(ValueError, match="No valid ground-truth depth"):
        evaluate_depth(depth, np.zeros_like(depth))
    with pytest.raises(ValueError, match=r"valid mask has shape \(3, 18\)"):
        evaluate_depth(depth, depth, valid=np.ones(depth.shape[:2], dtype=bool))


def test_l1_scale_is_ten_reweighted_steps_towards_the_l1_minimiser():
    """The L1 scale of the reference: from mean(gt) / mean(pred), ten least-squares steps weighted by
    1 / (|s pred - gt| + 1e-8), which approach the exact minimiser of sum |s pred - gt|, the median of the ratios
    gt / pred weighted by |pred|."""
    generator = np.random.default_rng(0)
    pred = generator.uniform(1.0, 5.0, 50)
    gt = pred * generator.uniform(0.5, 3.0, 50)
    scale = gt.mean() / pred.mean()
    for _ in range(10):
        weights = 1.0 / (np.abs(scale * pred - gt) + 1e-8)
        scale = (weights * pred * gt).sum() / (weights * pred * pred).sum()
    assert l1_scale(pred, gt) == pytest.approx(scale, rel=1e-12)
    ratios, order = gt / pred, np.argsort(gt / pred)
    cumulative = np.cumsum(pred[order])
    minimiser = ratios[order][np.searchsorted(cumulative, cumulative[-1] / 2)]
    assert l1_scale(pred, gt) == pytest.approx(minimiser, rel=1e-3)
    loss = lambda s: np.abs(s * pred - gt).sum()
    assert loss(minimiser) < loss(minimiser * (1 + 1e-6)) and loss(minimiser) < loss(minimiser * (1 - 1e-6))


def test_scale_alignments_of_one_pixel_empty_input_and_the_l1_floor():
    """One valid pixel is enough: every scale is gt / pred; no pixel, or mismatched shapes, are refused; a
    prediction that runs against the ground truth gets the documented L1 floor of 1e-3, not a negative scale."""
    for scale in (median_scale, least_squares_scale, l1_scale):
        assert scale(np.array([2.0]), np.array([3.0])) == pytest.approx(1.5)
        with pytest.raises(ValueError, match="No valid pixels to align"):
            scale(np.zeros(0), np.zeros(0))
        with pytest.raises(ValueError, match=r"prediction \(3,\) and ground truth \(2,\) must have the same shape"):
            scale(np.ones(3), np.ones(2))
    depth = np.array([1.0, 2.0, 4.0, 7.0])
    assert l1_scale(-depth, depth) == 1e-3
    assert least_squares_scale(-depth, depth) == pytest.approx(-1.0)
    assert median_scale(np.array([1.0, 2.0, 3.0]), np.array([6.0, 2.0, 3.0])) == pytest.approx(1.5)  # 3 / 2
    assert least_squares_scale_shift(np.array([1.0, 3.0]), np.array([2.0, 8.0])) == pytest.approx((3.0, -1.0))


def test_adam_scale_and_shift_start_at_the_median_ratio_and_step_by_the_learning_rate():
    """Adam's first step moves each parameter by its learning rate (1e-4 by default) against the sign of its
    gradient, from s = median(gt) / median(pred) = 5 / 2 and t = 0: here every residual s pred + t - gt is <= 0, so
    both go up."""
    pred, gt = np.array([1.0, 2.0, 3.0]), np.array([3.0, 5.0, 100.0])  # residuals -0.5, 0, -92.5
    assert adam_l1_scale_shift(pred, gt, max_steps=0) == (2.5, 0.0)
    assert adam_l1_scale_shift(pred, gt, max_steps=1) == (pytest.approx(2.5 + 1e-4), pytest.approx(1e-4))
    assert adam_l1_scale_shift(pred, gt, lr=1e-2, max_steps=1) == (pytest.approx(2.51), pytest.approx(1e-2))
    assert adam_l1_scale_shift(gt, gt) == (1.0, 0.0)  # an exact fit has no gradient and stays


def test_adam_scale_and_shift_stop_once_the_loss_stops_changing():
    """From s = 4 / 2, t = 0 the residuals s pred - gt are +1, 0, -3: the first step (s + 1e-4) leaves the loss
    sum |s pred + t - gt| at exactly 4 (the first and the middle residual gain 1e-4 and 2e-4, the last loses 3e-4),
    so Adam stops after its second step, within two learning rates of the start; without the stop it walks on."""
    pred, gt = np.array([1.0, 2.0, 3.0]), np.array([1.0, 4.0, 9.0])
    scale, shift = adam_l1_scale_shift(pred, gt)
    assert abs(scale - 2.0) < 2e-4 and abs(shift) < 2e-4
    assert abs(adam_l1_scale_shift(pred, gt, tolerance=0.0)[0] - 2.0) > 0.01


# ---- point maps ----------------------------------------------------------------------------------------------------


def test_umeyama_recovers_a_known_similarity(scene):
    room, _, _ = scene
    points = room.world_points.reshape(-1, 3).astype(np.float64)
    true_rotation = rotation("z", 30) @ rotation("x", -50)
    moved = 2.5 * points @ true_rotation.T + np.array([1.0, -2.0, 0.5])
    scale, found_rotation, translation = umeyama(moved, points)
    assert scale == pytest.approx(1 / 2.5)
    np.testing.assert_allclose(found_rotation.numpy(), true_rotation.T, atol=1e-10)
    np.testing.assert_allclose(scale * moved @ found_rotation.numpy().T + translation.numpy(), points, atol=1e-9)
    # a mirrored copy cannot be matched by a rotation: det stays +1
    _, mirrored_rotation, _ = umeyama(points * np.array([-1.0, 1.0, 1.0]), points)
    assert torch.det(mirrored_rotation).item() == pytest.approx(1.0)


def test_similar_point_maps_score_perfectly_after_alignment_only(scene):
    room, _, _ = scene
    gt = room.world_points.astype(np.float64)
    moved = 0.3 * gt @ (rotation("y", 70) @ rotation("x", 15)).T + np.array([4.0, 0.0, -1.0])
    aligned = evaluate_point_maps(moved, gt)
    assert aligned["accuracy"] == pytest.approx(0.0, abs=1e-7)
    assert aligned["completeness"] == pytest.approx(0.0, abs=1e-7)
    assert aligned["normal_consistency"] == pytest.approx(1.0)
    assert aligned["scale"] == pytest.approx(1 / 0.3)
    unaligned = evaluate_point_maps(moved, gt, align=False)
    assert unaligned["accuracy"] > 0.5 and unaligned["normal_consistency"] < 0.9  # the alignment did the work


def plane(rows: int = 6, columns: int = 7, tilt_degrees: float = 0.0, offset: float = 0.0) -> np.ndarray:
    """A grid of unit spacing in the z = offset plane, tilted about the x axis through its centre."""
    y, x = np.meshgrid(np.arange(rows) - (rows - 1) / 2, np.arange(columns) - (columns - 1) / 2, indexing="ij")
    grid = np.stack([x, y, np.zeros_like(x)], -1) @ rotation("x", tilt_degrees).T
    return (grid + np.array([0.0, 0.0, offset]))[None]


def test_known_offset_and_tilt_give_known_accuracy_and_normal_consistency():
    gt = plane()
    shifted = evaluate_point_maps(plane(offset=0.1), gt, align=False)
    assert shifted["accuracy"] == pytest.approx(0.1)
    assert shifted["completeness"] == pytest.approx(0.1)
    assert shifted["normal_consistency"] == pytest.approx(1.0)
    tilted = point_cloud_metrics(
        plane(tilt_degrees=25).reshape(-1, 3),
        gt.reshape(-1, 3),
        grid_normals(plane(tilt_degrees=25)).reshape(-1, 3),
        grid_normals(gt).reshape(-1, 3),
    )
    assert tilted["normal_consistency"] == pytest.approx(np.cos(np.radians(25)))


def test_medians_are_numpy_medians_of_an_even_count():
    # four points far apart, each prediction above its own: distances and normal angles are known per pair
    gt = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [20.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    distances, angles = np.array([0.1, 0.2, 0.4, 0.8]), np.radians([0.0, 20.0, 40.0, 60.0])
    pred = gt + distances[:, None] * np.array([0.0, 0.0, 1.0])
    gt_normals = np.tile([0.0, 0.0, 1.0], (4, 1))
    pred_normals = np.stack([np.zeros(4), np.sin(angles), np.cos(angles)], -1)
    metrics = point_cloud_metrics(pred, gt, pred_normals, gt_normals)
    # the mean of the two middle values (0.3), not torch's lower median (0.2), as the reference's np.median
    assert metrics["accuracy_median"] == pytest.approx(0.3)
    assert metrics["completeness_median"] == pytest.approx(0.3)
    assert metrics["nc_accuracy_median"] == pytest.approx(np.median(np.cos(angles)))
    assert metrics["nc_completeness_median"] == pytest.approx((np.cos(angles[1]) + np.cos(angles[2])) / 2)
    assert metrics["accuracy"] == pytest.approx(distances.mean())


def test_neighbour_searches_check_their_clouds():
    cloud = np.random.default_rng(0).normal(size=(5, 3))
    for queries, points in ((np.zeros((0, 3)), cloud), (cloud, np.zeros((0, 3))), (cloud[:, :2], cloud)):
        with pytest.raises(ValueError, match=r"must be a non-empty \(M, 3\) array"):
            k_nearest_with_distances(queries, points, 2)
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        k_nearest_with_distances(cloud, cloud, 2, chunk_size=0)
    with pytest.raises(ValueError, match="at least 3 points, got \\(2, 3\\)"):
        knn_normals(cloud[:2])
    distances, indices = k_nearest_with_distances(cloud, cloud, 10)  # k capped at the cloud's 5 points
    assert distances.shape == indices.shape == (5, 5) and indices[:, 0].tolist() == list(range(5))


def test_knn_normals_of_a_tilted_plane_and_icp_undo_a_small_rigid_motion():
    tilted = plane(9, 9, tilt_degrees=35).reshape(-1, 3)
    expected = rotation("x", 35) @ np.array([0.0, 0.0, 1.0])
    cosines = knn_normals(tilted, k=8).numpy() @ expected
    np.testing.assert_allclose(np.abs(cosines), 1.0, atol=1e-12)
    gt = plane(9, 9).reshape(-1, 3) + np.array([0, 0, 1.0]) * (np.arange(81) % 3)[:, None] * 0.5  # three levels
    moved = gt @ rotation("z", 2).T + np.array([0.05, -0.03, 0.02])
    refined = icp_refine(torch.from_numpy(moved), torch.from_numpy(gt), max_distance=0.3)
    np.testing.assert_allclose(refined.numpy(), gt, atol=1e-6)  # stops once fitness and RMSE change < 1e-6
    metrics = evaluate_point_maps(moved[None, None], gt[None, None], align=False, icp_distance=0.3)
    assert metrics["accuracy"] == pytest.approx(0.0, abs=1e-6)
    assert evaluate_point_maps(moved[None, None], gt[None, None], align=False)["accuracy"] > 0.02


def test_chunked_nearest_neighbours_match_the_full_distance_matrix():
    generator = torch.Generator().manual_seed(0)
    queries, points = torch.rand(50, 3, generator=generator), torch.rand(40, 3, generator=generator)
    distance, index = nearest_neighbours(queries, points, chunk_size=7)
    full = torch.cdist(queries.double(), points.double())
    torch.testing.assert_close(distance, full.min(1).values)
    torch.testing.assert_close(index, full.argmin(1))
    with pytest.raises(ValueError, match=r"\(M, 3\)"):
        nearest_neighbours(queries[:, :2], points)


def test_blocked_k_nearest_and_normals_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    queries, points = torch.rand(60, 3, generator=generator), torch.rand(45, 3, generator=generator)
    distance, index = k_nearest_with_distances(queries, points, 5, chunk_size=7)  # blocks of 7 x 7, k over blocks
    full = torch.cdist(queries.double(), points.double()).sort(dim=1)
    torch.testing.assert_close(distance, full.values[:, :5])
    torch.testing.assert_close(index, full.indices[:, :5])
    cloud = torch.rand(80, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 1.0, 0.01])
    neighbourhoods = cloud[torch.cdist(cloud, cloud).topk(10, dim=1, largest=False).indices]
    centred = neighbourhoods - neighbourhoods.mean(1, keepdim=True)
    expected = torch.linalg.eigh(centred.transpose(1, 2) @ centred / 10).eigenvectors[..., 0]
    torch.testing.assert_close(knn_normals(cloud, 10, chunk_size=9).abs(), expected.abs())


def reference_icp(source: np.ndarray, target: np.ndarray, max_distance: float) -> tuple[np.ndarray, int]:
    """Point-to-point ICP as Open3D's `registration_icp` runs it with its default criteria (30 iterations, relative
    fitness and RMSE 1e-6), by brute force: all pair distances, and each rigid motion by Kabsch's SVD. Returns the
    moved source and the number of motions applied (30 when the criterion never stopped it)."""
    moved, previous, steps = source.copy(), None, 0
    for _ in range(30):
        distances = np.linalg.norm(moved[:, None] - target[None], axis=-1)
        index = distances.argmin(1)
        distance = distances[np.arange(len(moved)), index]
        inliers = distance < max_distance
        fitness, rmse = inliers.mean(), np.sqrt((distance[inliers] ** 2).mean())
        if previous is not None and abs(fitness - previous[0]) < 1e-6 and abs(rmse - previous[1]) < 1e-6:
            break
        previous = (fitness, rmse)
        x, y = moved[inliers], target[index[inliers]]
        u, _, vt = np.linalg.svd((y - y.mean(0)).T @ (x - x.mean(0)))
        r = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
        moved = moved @ r.T + (y.mean(0) - r @ x.mean(0))
        steps += 1
    return moved, steps


def wavy_surface(count: int, seed: int, amplitude: float, frequencies: tuple[float, float]) -> np.ndarray:
    """`count` random samples of z = amplitude sin(fx x) cos(fy y) over [-1, 1]²."""
    x, y = np.random.default_rng(seed).uniform(-1, 1, size=(count, 2)).T
    return np.stack([x, y, amplitude * np.sin(frequencies[0] * x) * np.cos(frequencies[1] * y)], -1)


@pytest.mark.parametrize(
    "amplitude, frequencies, seed, degrees, shift, max_distance, stops_early",
    [
        (0.3, (2.0, 3.0), 0, 8.0, (0.05, -0.04, 0.03), 0.3, True),  # stops on the 1e-6 criterion
        (0.15, (1.5, 1.0), 2, 10.0, (0.15, -0.1, 0.03), 0.5, False),  # still moving after the 30 steps
    ],
)
def test_icp_matches_brute_force_open3d_icp_and_stays_rigid(
    amplitude, frequencies, seed, degrees, shift, max_distance, stops_early
):
    """Two samplings of one surface (no exact pairs: the pairs change from step to step): the refined cloud is
    Open3D's default ICP result, one stopping on the fitness and RMSE criterion, one at the 30-iteration cap, and a
    rigid motion of the source (its pairwise distances kept: no scale is fitted)."""
    target = wavy_surface(300, seed, amplitude, frequencies)
    source = wavy_surface(200, seed + 100, amplitude, frequencies) @ rotation("z", degrees).T + np.array(shift)
    refined = icp_refine(torch.from_numpy(source), torch.from_numpy(target), max_distance).numpy()
    expected, steps = reference_icp(source, target, max_distance)
    assert (steps < 30) == stops_early  # each case exercises the criterion it is there for
    np.testing.assert_allclose(refined, expected, atol=1e-10)
    pairwise = np.linalg.norm(source[:, None] - source[None], axis=-1)
    np.testing.assert_allclose(np.linalg.norm(refined[:, None] - refined[None], axis=-1), pairwise, atol=1e-10)


def test_icp_needs_three_pairs_closer_than_max_distance():
    """Three pairs suffice for a rigid fit (a slightly moved triangle goes back exactly), two do not (the cloud is
    left as it is); a pair exactly at `max_distance` is not closer than it and takes no part in a step (its four
    exact pairs keep the cloud where it is)."""
    triangle = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    moved = triangle @ rotation("z", 3).T + np.array([0.02, -0.01, 0.01])
    refined = icp_refine(torch.from_numpy(moved), torch.from_numpy(triangle), max_distance=0.5)
    np.testing.assert_allclose(refined.numpy(), triangle, atol=1e-9)
    corners = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    source = np.concatenate([corners, [[5.0, 0.0, 0.0]]])  # 4 from its nearest corner, (1, 0, 0)
    # one step: the rounding of the identity fit would bring the pair to 4 - 3e-15 in the next
    refined = icp_refine(torch.from_numpy(source), torch.from_numpy(corners), max_distance=4.0, iterations=1)
    np.testing.assert_allclose(refined.numpy(), source, atol=1e-12)
    two = torch.from_numpy(moved[:2])
    assert torch.equal(icp_refine(two, torch.from_numpy(triangle), max_distance=0.5), two)


def test_grid_normals_are_unit_plane_normals_for_any_spacing_and_batch_shape():
    """A tilted plane with a millimetre pixel spacing has unit normals along its tilted axis, for one (H, W, 3) map,
    a batch of maps and a map of two rows (central differences need no third row)."""
    expected = rotation("x", 35) @ np.array([0.0, 0.0, 1.0])
    tilted = plane(5, 6, tilt_degrees=35)[0] * 1e-3
    for points in (tilted, np.stack([tilted, tilted + 1.0]), tilted[:2], tilted[:, :2]):
        normals = grid_normals(points).numpy()
        assert normals.shape == points.shape
        np.testing.assert_allclose(np.abs(normals @ expected), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match=r"must be \(\.\.\., H, W, 3\), got \(6, 3\)"):
        grid_normals(tilted[0])
    with pytest.raises(ValueError, match=r"got \(5, 6, 2\)"):
        grid_normals(tilted[..., :2])


def test_grid_normals_of_a_single_row_or_column_are_zero():
    """A map of one row (or one column) spans no surface: the cross product vanishes and its normals are zero."""
    row = plane(1, 6)[0]
    for points in (row, row.transpose(1, 0, 2)):
        assert torch.equal(grid_normals(points), torch.zeros(points.shape, dtype=torch.float64))


def test_medians_of_an_odd_count_and_of_one_point_and_normals_of_the_wrong_shape():
    """With an odd count the median is the middle value (numpy's); one point is its own median; normals given for
    only one cloud add no normal metrics, normals of another shape than their cloud are refused."""
    gt = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [20.0, 0.0, 0.0], [30.0, 0.0, 0.0], [40.0, 0.0, 0.0]])
    distances = np.array([0.8, 0.1, 1.6, 0.2, 0.4])
    pred = gt + distances[:, None] * np.array([0.0, 0.0, 1.0])
    metrics = point_cloud_metrics(pred, gt)
    assert sorted(metrics) == ["accuracy", "accuracy_median", "completeness", "completeness_median"]
    assert metrics["accuracy_median"] == metrics["completeness_median"] == pytest.approx(np.median(distances))
    assert point_cloud_metrics(pred[:1], gt[:1])["accuracy_median"] == pytest.approx(0.8)
    normals = np.tile([0.0, 0.0, 1.0], (5, 1))
    assert "normal_consistency" not in point_cloud_metrics(pred, gt, pred_normals=normals)
    assert "normal_consistency" not in point_cloud_metrics(pred, gt, gt_normals=normals)
    for pred_normals, gt_normals in ((normals[:4], normals), (normals, normals[:, :2])):
        with pytest.raises(ValueError, match="Normals must have the shapes of their point clouds"):
            point_cloud_metrics(pred, gt, pred_normals, gt_normals)


def test_point_maps_with_grid_normals_of_a_crease_by_hand():
    """A roof z = 0.2 |x| over a flat ground truth, 6 x 7 pixels of unit spacing, without alignment: each point is
    0.2 |x| above its own ground-truth point; the pixel-grid normals are those of the slopes, cos = 1 / sqrt(1.04),
    but flat on the ridge column, where the central difference spans both slopes."""
    flat = plane(6, 7)
    roof = flat + 0.2 * np.abs(flat[..., :1]) * np.array([0.0, 0.0, 1.0])
    metrics = evaluate_point_maps(roof, flat, align=False, normals="grid")
    assert metrics["accuracy"] == metrics["completeness"] == pytest.approx(0.2 * 12 / 7)  # mean |x| over -3..3
    expected = 6 / 7 / np.sqrt(1.04) + 1 / 7
    assert metrics["nc_accuracy"] == metrics["nc_completeness"] == pytest.approx(expected)
    assert metrics["normal_consistency"] == pytest.approx(expected)
    assert metrics["scale"] == 1.0 and metrics["valid_points"] == 42


def brute_force_normals(points: np.ndarray, k: int) -> np.ndarray:
    """PCA normals from all pair distances: the eigenvector of the smallest eigenvalue of each k-neighbourhood."""
    neighbours = points[np.argsort(np.linalg.norm(points[:, None] - points[None], axis=-1), axis=1)[:, :k]]
    centred = neighbours - neighbours.mean(1, keepdims=True)
    return np.linalg.eigh(np.einsum("nki,nkj->nij", centred, centred))[1][..., 0]


def test_point_maps_with_knn_normals_match_brute_force_over_30_neighbours():
    """Two different curved clouds: accuracy and completeness are the mean nearest distances, and the normal
    consistency is that of PCA normals over each point's 30 nearest neighbours (the reference's Open3D default),
    all by brute force."""
    gt = wavy_surface(110, 3, 0.4, (2.5, 2.0))
    pred = wavy_surface(110, 4, 0.5, (2.0, 2.5))
    metrics = evaluate_point_maps(pred[None, None], gt[None, None], align=False)
    distances = np.linalg.norm(pred[:, None] - gt[None], axis=-1)
    to_gt, to_pred = distances.argmin(1), distances.argmin(0)
    assert metrics["accuracy"] == pytest.approx(distances.min(1).mean(), rel=1e-12)
    assert metrics["completeness"] == pytest.approx(distances.min(0).mean(), rel=1e-12)
    pred_normals, gt_normals = brute_force_normals(pred, 30), brute_force_normals(gt, 30)
    nc_accuracy = np.abs((pred_normals * gt_normals[to_gt]).sum(-1))
    nc_completeness = np.abs((gt_normals * pred_normals[to_pred]).sum(-1))
    assert metrics["nc_accuracy"] == pytest.approx(nc_accuracy.mean(), rel=1e-9)
    assert metrics["nc_completeness"] == pytest.approx(nc_completeness.mean(), rel=1e-9)
    assert metrics["nc_accuracy_median"] == pytest.approx(np.median(nc_accuracy), rel=1e-9)


def test_point_maps_check_their_input_and_score_three_valid_points():
    """Three valid points are enough (for the alignment and the normals), two are refused; so are maps of another
    shape and unknown normals."""
    gt = plane(2, 2)
    pred = 2.0 * gt @ rotation("z", 40).T + np.array([1.0, 0.0, 0.0])
    valid = np.array([[[True, True], [True, False]]])
    metrics = evaluate_point_maps(pred, gt, valid)
    assert metrics["valid_points"] == 3 and metrics["scale"] == pytest.approx(0.5)
    assert metrics["accuracy"] == pytest.approx(0.0, abs=1e-12)
    valid[0, 0, 0] = False
    with pytest.raises(ValueError, match="Fewer than 3 valid points"):
        evaluate_point_maps(pred, gt, valid)
    for bad_pred, bad_gt in ((pred[:, :1], gt), (pred[0], gt[0]), (pred[..., :2], gt[..., :2])):
        with pytest.raises(ValueError, match=r"must both be \(N, H, W, 3\) of one size"):
            evaluate_point_maps(bad_pred, bad_gt)
    with pytest.raises(ValueError, match="Unknown normals 'pca'"):
        evaluate_point_maps(pred, gt, normals="pca")


def test_grid_normals_leave_out_dropped_points_non_finite_or_masked():
    """Non-finite points are dropped, and with normals='grid' their finite neighbours do not take them in (one NaN
    predicted pixel in a 6 x 7 plane made nc_accuracy, nc_completeness and normal_consistency NaN while their medians
    read 1); nor do pixels outside the valid mask holding garbage (invalid ground truth stored as 0, 0, 0): the
    neighbours' differences become one-sided, and a flat plane keeps normal consistency 1 exactly."""
    gt = plane(6, 7)
    pred = gt.copy()
    pred[0, 2, 3] = np.nan
    metrics = evaluate_point_maps(pred, gt, align=False, normals="grid")
    assert metrics["valid_points"] == 41
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=1e-12)
    valid = np.ones((1, 6, 7), bool)
    valid[0, 3, 4] = False
    gt[0, 3, 4] = 0.0
    metrics = evaluate_point_maps(gt.copy(), gt, valid=valid, align=False, normals="grid")
    assert metrics["valid_points"] == 41
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=1e-12)
    normals = grid_normals(gt, valid).numpy()
    assert not normals[0, 3, 4].any()  # the dropped pixel itself has no normal
    assert np.allclose(np.abs(normals[valid]), np.abs(normals[0, 0, 0]), atol=1e-12)  # one plane: one normal


MEMORY_PROBE = """
import resource, sys, torch
from g2vlm_hf.evaluation.points import k_nearest_with_distances, nearest_neighbours
generator = torch.Generator().manual_seed(0)
points = torch.rand(2 * 1036 * 280, 3, generator=generator, dtype=torch.float64)  # two 1036x280 views of points
queries = points[torch.randperm(points.shape[0], generator=generator)[:4096]]
nearest_neighbours(queries[:8], points[:8])  # warm-up: torch's own buffers are not the search's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
distance, index = nearest_neighbours(queries, points)
assert float(distance.max()) < 1e-6  # every query is one of the points
k_nearest_with_distances(queries[:2048], points, 30)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)  # MB (ru_maxrss is in KB on Linux)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux")
def test_nearest_neighbours_memory_does_not_grow_with_the_cloud():
    # the old search held 4096 x K distances: 19 GB against the 580,160 points of two 1036x280 views
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    assert growth_mb < 400, f"the search grew the peak memory by {growth_mb:.0f} MB"


# ---- camera poses -------------------------------------------------------------------------------------------------


def test_globally_transformed_trajectories_score_perfectly_a_moved_camera_does_not(scene):
    _, poses, _ = scene
    similarity = np.eye(4)
    similarity[:3, :3], similarity[:3, 3] = rotation("z", 40) @ rotation("y", 10), [3.0, -1.0, 2.0]
    moved = similarity @ poses
    moved[:, :3, 3] *= 2.0  # global scale of the trajectory
    rotation_error, translation_error = relative_pose_errors(moved, poses)
    assert rotation_error.max() < 1e-5 and translation_error.max() < 1e-5
    metrics = evaluate_poses(moved, poses)
    assert metrics["rra@5"] == metrics["rta@5"] == metrics["auc@30"] == 1.0
    # one camera moved sideways (not a global change): its two pairs get a translation-direction error, the third
    # pair none, and no pair a rotation error
    moved[2, :3, 3] += 5.0 * moved[2, :3, 0]
    rotation_error, translation_error = relative_pose_errors(moved, poses)
    assert rotation_error.max() < 1e-5
    assert (translation_error > 5.0).sum() == 2 and translation_error.min() < 1e-5
    assert evaluate_poses(moved, poses)["rta@5"] == pytest.approx(1 / 3)


def test_a_known_rotation_error_gives_known_pair_errors_and_auc(scene):
    _, poses, _ = scene
    perturbed = poses.copy()
    perturbed[0, :3, :3] = poses[0, :3, :3] @ rotation("x", 10.5)  # camera 0 turned in place
    rotation_error, translation_error = relative_pose_errors(perturbed, poses)
    np.testing.assert_allclose(rotation_error.numpy(), [10.5, 10.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(translation_error.numpy(), [0.0, 0.0, 0.0], atol=1e-5)
    metrics = evaluate_poses(perturbed, poses)
    assert metrics["rra@5"] == pytest.approx(1 / 3)
    assert metrics["rra@15"] == 1.0
    assert metrics["auc@30"] == pytest.approx((10 * (1 / 3) + 20 * 1.0) / 30)  # max error 10.5 < k from k = 11


def test_translation_angle_and_auc_definitions():
    a = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 0], [-3.0, 0, 0], [0.0, 0, 0]], dtype=torch.float64)
    np.testing.assert_allclose(direction_angle_degrees(a, b).numpy(), [45.0, 0.0, 90.0], atol=1e-6)
    # max errors 0.5, 2.5, 40: below k for k = 1, 2 is 1/3, for k = 3..30 it is 2/3
    auc = pose_auc(np.array([0.5, 1.0, 40.0]), np.array([0.1, 2.5, 3.0]))
    assert auc == pytest.approx((2 * (1 / 3) + 28 * (2 / 3)) / 30)
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        relative_pose_errors(np.eye(4), np.eye(4))


def test_pose_metrics_count_an_error_at_a_threshold_as_a_miss():
    """The protocol's `error < t` for RRA@t, RTA@t and the AUC's bins, `<= 30` for its last bin only; the default
    thresholds are 5, 15 and 30 degrees."""
    rotation_error = torch.tensor([5.0, 15.0, 30.0], dtype=torch.float64)
    translation_error = torch.tensor([0.0, 15.0, 4.0], dtype=torch.float64)
    metrics = summarize_pose_errors(rotation_error, translation_error)
    assert sorted(metrics) == sorted(
        [f"{kind}@{t}" for t in (5, 15, 30) for kind in ("rra", "rta")]
        + ["auc@30", "rotation_error_mean", "translation_error_mean", "pairs"]
    )
    assert (metrics["rra@5"], metrics["rra@15"], metrics["rra@30"]) == (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert (metrics["rta@5"], metrics["rta@15"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    # max errors 5, 15, 30: under k for none up to k = 5, one for k = 6..15, two for k = 16..29, all three at 30
    assert metrics["auc@30"] == pytest.approx((10 / 3 + 14 * 2 / 3 + 1) / 30)
    assert metrics["pairs"] == 3


def test_rotation_errors_of_equal_and_opposite_rotations_are_exact():
    """Rounding puts the cosine a hair outside [-1, 1] for equal rotations or half turns: clamped, not NaN."""
    generator = torch.Generator().manual_seed(0)
    rotations = torch.linalg.qr(torch.randn(500, 3, 3, generator=generator, dtype=torch.float64)).Q
    rotations = rotations * torch.det(rotations)[:, None, None]  # det +1
    same = rotation_angle_degrees(rotations, rotations)
    assert bool(same.isfinite().all()) and float(same.max()) < 1e-5
    half_turn = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    opposite = rotation_angle_degrees(rotations, rotations @ half_turn)
    assert bool(opposite.isfinite().all()) and float((opposite - 180.0).abs().max()) < 1e-5


def test_a_zero_length_translation_scores_ninety_degrees_on_either_side():
    zero, x = torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert direction_angle_degrees(zero, x).tolist() == direction_angle_degrees(x, zero).tolist() == [90.0]


def test_pose_inputs_are_checked():
    poses = np.tile(np.eye(4), (3, 1, 1))
    with pytest.raises(ValueError, match=r"\(N, 4, 4\) camera-to-world matrices, got \(3, 3, 4\)"):
        relative_pose_errors(poses[:, :3], poses)
    with pytest.raises(ValueError, match=r"same number \(>= 2\) of predicted and true poses, got 1 and 1"):
        relative_pose_errors(poses[:1], poses[:1])
    with pytest.raises(ValueError, match=r"got 3 and 2"):
        relative_pose_errors(poses, poses[:2])


# ---- spatial VQA ------------------------------------------------------------------------------------------------


def test_render_room_checks_its_cameras_and_size():
    pose = yaw_pose(0.0, 0.0, 10.0)
    assert render_room(pose[None], 6, 8).images.shape == (1, 6, 8, 3)
    with pytest.raises(ValueError, match=r"\(views, 4, 4\) camera-to-world matrices, got shape \(4, 4\)"):
        render_room(pose, 6, 8)
    with pytest.raises(ValueError, match=r"height and width must be positive integers, got 6\.5 and 8"):
        render_room(pose[None], 6.5, 8)


def test_mean_relative_accuracy_known_values():
    assert mean_relative_accuracy(2.0, 2.0) == 1.0
    assert mean_relative_accuracy(2.24, 2.0) == pytest.approx(0.8)  # error 0.12 passes theta = 0.50 ... 0.85
    assert mean_relative_accuracy(3.0, 2.0) == pytest.approx(0.1)  # error 0.5 passes theta = 0.50 only
    assert mean_relative_accuracy(3.2, 2.0) == 0.0
    assert mean_relative_accuracy(None, 2.0) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        mean_relative_accuracy(1.0, 0.0)


def test_answer_parsing():
    choices = ["A. left", "B. right", "C. up"]
    assert extract_choice("B", choices) == "B"
    assert extract_choice("(c) up, clearly", choices) == "C"
    assert extract_choice("The answer is A.", choices) == "A"
    assert extract_choice("It moved to the right.", choices) == "B"
    assert extract_choice("left or right", choices) is None
    assert extract_choice("I think B", choices) == "B"
    assert extract_choice("Between B and C, unsure", choices) is None  # two candidate letters: no guess
    assert extract_choice("D", choices) is None
    assert parse_number("about 1,250.5 meters") == 1250.5
    assert parse_number("no idea") is None


def test_vqa_scores_on_questions_from_a_rendered_scene(scene):
    room, _, _ = scene
    pairs = spatial_questions(room)
    (_, side), (_, distance) = pairs[0], pairs[1]
    record = {"answer": "A" if side == "left" else "B", "choices": ["A. left", "B. right"], "type": "multiple_choice"}
    assert score_answer(record, side) == 1.0
    assert score_answer(record, "right" if side == "left" else "left") == 0.0
    numeric = {"answer": distance, "type": "numeric"}
    assert score_answer(numeric, distance) == 1.0
    value = parse_number(distance)
    assert score_answer(numeric, f"{value * 1.3:.4f} m") == pytest.approx(0.5)  # error 0.3 passes 0.50 ... 0.70
    with pytest.raises(ValueError, match="Multiple-choice question 'q7' has no `choices`"):
        score_answer({"id": "q7", "answer": "A", "type": "multiple_choice"}, "A")
    summary = summarize_vqa([("a", 1.0), ("a", 0.0), ("b", 1.0)])
    assert summary["overall"] == pytest.approx(2 / 3)
    assert summary["category_mean"] == pytest.approx(0.75)
    assert summary["category/a"] == 0.5


# ---- data formats -------------------------------------------------------------------------------------------------


def test_scene_folders_round_trip_and_bad_folders_raise(scene, tmp_path):
    room, poses, depth = scene
    write_scene(tmp_path / "kitchen" / "seq1", room.images, depth=depth, poses=poses, valid=room.valid_mask)
    write_scene(tmp_path / "loose", room.images[:2], depth=depth[:2])
    scenes = find_scenes(tmp_path, "depth")
    assert [(s.name, s.category, len(s.image_paths)) for s in scenes] == [
        ("kitchen/seq1", "kitchen", 3),
        ("loose", "", 2),
    ]
    np.testing.assert_array_equal(scenes[0].depth, depth)
    with pytest.raises(ValueError, match="no 'poses' array"):
        find_scenes(tmp_path, "poses")
    np.savez(tmp_path / "loose" / "gt.npz", depth=depth)  # 3 depth maps, 2 images
    with pytest.raises(ValueError, match="has 3 views but"):
        find_scenes(tmp_path, "depth")
    np.savez(tmp_path / "loose" / "gt.npz", depth=depth[:2, 0])
    with pytest.raises(ValueError, match=r"expected \(N, H, W\)"):
        find_scenes(tmp_path, "depth")
    with pytest.raises(ValueError, match="No scene found"):
        find_scenes(tmp_path / "kitchen" / "seq1" / "images", "depth")


def test_question_files_are_checked_line_by_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = {"id": "q1", "images": ["a.png"], "question": "Left or right?", "answer": "A", "choices": ["A. l", "B. r"]}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "q2", "type": "numeric", "answer": "2"}))
    questions = load_questions(path)
    assert [(q.id, q.type, q.image_paths[0].name) for q in questions] == [("q1", "multiple_choice", "a.png"),
                                                                          ("q2", "numeric", "a.png")]  # fmt: skip
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_questions(path)
    path.write_text(json.dumps({**good, "images": ["missing.png"]}))
    with pytest.raises(ValueError, match="image files not found"):
        load_questions(path)
    path.write_text(json.dumps({"images": ["a.png"], "question": "?"}))
    with pytest.raises(ValueError, match=r"missing \['answer'\]"):
        load_questions(path)
    path.write_text(json.dumps({**good, "answer": "C"}))
    with pytest.raises(ValueError, match="must be one of the option letters"):
        load_questions(path)
    path.write_text(json.dumps({**good, "choices": [], "answer": "far"}))
    with pytest.raises(ValueError, match="numeric answer must be a non-zero number"):
        load_questions(path)


@pytest.mark.parametrize(
    ("images", "ground_truth", "message"),
    [
        (np.full((2, 8, 12, 3), 0.5), {}, r"must be \(N, H, W, 3\) uint8 with N >= 1, got float64"),
        (np.zeros((2, 8, 12, 3), np.uint16), {}, "got uint16"),
        (np.zeros((2, 8, 12), np.uint8), {}, r"of shape \(2, 8, 12\)"),
        (np.zeros((0, 8, 12, 3), np.uint8), {}, "N >= 1"),
        (np.zeros((2, 8, 12, 3), np.uint8), {"depth": np.ones((3, 8, 12))}, "'depth' has 3 views but there are 2"),
        (np.zeros((2, 8, 12, 3), np.uint8), {"depth": np.ones((2, 12, 8))}, "'depth' is 12x8 but the images are 8x12"),
        (np.zeros((2, 8, 12, 3), np.uint8), {"poses": np.ones((2, 3, 4))}, r"'poses' has shape \(2, 3, 4\)"),
        (np.zeros((2, 8, 12, 3), np.uint8), {"depth": np.full((2, 8, 12), "1")}, "'depth' holds <U1 values"),
    ],
)
def test_write_scene_refuses_what_the_evaluation_could_not_read(tmp_path, images, ground_truth, message):
    """Float images were written black, uint16 ones wrapped, and mismatched ground truth failed only when the
    evaluation read it back; now nothing is written."""
    with pytest.raises(ValueError, match=message):
        write_scene(tmp_path / "scene", images, **ground_truth)
    assert list(tmp_path.iterdir()) == []
