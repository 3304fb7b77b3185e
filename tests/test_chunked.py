"""Chunked reconstruction: the chunk plan, the robust similarity fit, and the merge of long synthetic trajectories
whose per-chunk "predictions" are the ground truth in a random similarity frame per chunk, plus noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_trajectories import FOCAL, HEIGHT, WIDTH, random_similarity, rotation_from_vector
from transformers import BatchFeature

import g2vlm_hf.chunked as chunked
from g2vlm_hf.chunked import (
    ChunkAligner,
    merge_chunks,
    number_of_chunks,
    place_window,
    plan_chunks,
    reconstruct_chunked,
    stream_reconstruction,
    transform_reconstruction,
)
from g2vlm_hf.modeling.outputs import G2VLMReconstructionOutput
from g2vlm_hf.similarity import Similarity, robust_umeyama, umeyama


class Walk:
    """Ground truth of a long walk: cameras along a wandering path looking ahead, with per-pixel depths."""

    def __init__(self, num_views: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        steps = np.arange(num_views) * 0.05
        positions = np.stack([3 * np.sin(steps), 0.3 * np.sin(3 * steps), 2 * steps], axis=1)
        turns = np.stack([0.1 * np.cos(2 * steps), 0.5 * np.sin(steps), np.zeros_like(steps)], axis=1)
        rotations = np.stack([rotation_from_vector(turn) for turn in turns])
        self.poses = torch.eye(4, dtype=torch.float64).repeat(num_views, 1, 1)
        self.poses[:, :3, :3], self.poses[:, :3, 3] = torch.from_numpy(rotations), torch.from_numpy(positions)
        rows, columns = torch.meshgrid(torch.arange(HEIGHT) + 0.5, torch.arange(WIDTH) + 0.5, indexing="ij")
        rays = torch.stack([(columns - WIDTH / 2) / FOCAL, (rows - HEIGHT / 2) / FOCAL, torch.ones_like(rows)], -1)
        depth = torch.from_numpy(rng.uniform(1.0, 6.0, (num_views, HEIGHT, WIDTH)))
        self.local = rays.double() * depth[..., None]


def world_from(poses: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nij,nhwj->nhwi", poses[:, :3, :3], local) + poses[:, None, None, :3, 3]


class FakeModel:
    """Stands in for the network: `reconstruct` returns the ground truth of the requested views in a fresh random
    similarity frame, with pose noise (rotation `rotation_noise` rad, translation `translation_noise`), relative depth
    noise `depth_noise`, and a share `outlier_share` of pixels whose world points are thrown far off (confidence -8
    when `flag_outliers`)."""

    device = torch.device("cpu")

    def __init__(self, walk: Walk, seed=1, rotation_noise=0.0, translation_noise=0.0, depth_noise=0.0,
                 outlier_share=0.0, flag_outliers=False):  # fmt: skip
        self.walk, self.rng = walk, np.random.default_rng(seed)
        self.rotation_noise, self.translation_noise, self.depth_noise = rotation_noise, translation_noise, depth_noise
        self.outlier_share, self.flag_outliers = outlier_share, flag_outliers
        self.frames: list[Similarity] = []
        self.global_frames: list[Similarity] = []  # the global head's own frame, unrelated to the poses'

    def reconstruct(self, geometry_pixel_values: torch.Tensor, **kwargs) -> G2VLMReconstructionOutput:
        index = geometry_pixel_values[0, :, 0, 0, 0].long()
        poses, local = self.walk.poses[index].clone(), self.walk.local[index].clone()
        count = len(index)
        noise = np.stack([rotation_from_vector(v) for v in self.rng.normal(0, self.rotation_noise, (count, 3))])
        poses[:, :3, :3] = torch.from_numpy(noise) @ poses[:, :3, :3]
        poses[:, :3, 3] += torch.from_numpy(self.rng.normal(0, self.translation_noise, (count, 3)))
        local = local * (1 + torch.from_numpy(self.rng.normal(0, self.depth_noise, local.shape[:-1])))[..., None]
        frame, global_frame = random_similarity(self.rng), random_similarity(self.rng)
        self.frames.append(frame)
        self.global_frames.append(global_frame)
        global_points = global_frame.apply(world_from(poses, local))
        local = local * frame.scale
        poses = frame.apply_to_poses(poses)
        world = world_from(poses, local)
        outliers = torch.from_numpy(self.rng.random(world.shape[:-1]) < self.outlier_share)
        world[outliers] += torch.from_numpy(self.rng.normal(0, 50 * frame.scale, (int(outliers.sum()), 3)))
        confidence = torch.where(outliers, -8.0, 4.0).float() if self.flag_outliers else None
        fields = dict(camera_poses=poses, local_points=local, world_points=world, global_points=global_points,
                      depth=local[..., 2], intrinsics=torch.eye(3).repeat(count, 1, 1))  # fmt: skip
        fields = {name: value.float()[None] for name, value in fields.items()}
        return G2VLMReconstructionOutput(**fields, confidence=None if confidence is None else confidence[None])


def index_processor(geometry_images, return_tensors="pt"):
    """Stands in for the processor: the view indices ride in the pixels."""
    pixels = torch.zeros(1, len(geometry_images), 3, 1, 1)
    pixels[0, :, 0, 0, 0] = torch.tensor(geometry_images, dtype=torch.float32)
    return BatchFeature({"geometry_pixel_values": pixels})


def merged_walk(walk: Walk, model: FakeModel, chunk_size=32, overlap=8) -> G2VLMReconstructionOutput:
    views = range(walk.poses.shape[0])
    return merge_chunks(stream_reconstruction(model, index_processor, views, chunk_size, overlap))


def trajectory_error(poses: torch.Tensor, truth: torch.Tensor) -> float:
    """ATE: RMSE of the camera positions after the one similarity that best maps them onto the truth."""
    scale, rotation, translation = umeyama(poses[:, :3, 3], truth[:, :3, 3])
    moved = Similarity(scale, rotation, translation).apply(poses[:, :3, 3].double())
    return float((moved - truth[:, :3, 3]).square().sum(1).mean().sqrt())


# ------------------------------------------------------------------------------------------------------ chunk plan


def test_chunks_overlap_and_the_last_one_is_filled_back():
    chunks = list(plan_chunks(range(11), chunk_size=4, overlap=2))
    assert chunks == [([0, 1, 2, 3], 0), ([2, 3, 4, 5], 2), ([4, 5, 6, 7], 2), ([6, 7, 8, 9], 2), ([7, 8, 9, 10], 3)]
    assert number_of_chunks(11, 4, 2) == len(chunks)
    assert list(plan_chunks(range(3), chunk_size=4, overlap=2)) == [([0, 1, 2], 0)]
    for chunk_size, overlap in [(7, 3), (2, 1), (5, 4)]:  # the smallest chunk and overlap allowed, the largest overlap
        for num_views in range(40):
            plan = list(plan_chunks(range(num_views), chunk_size, overlap))
            new = [view for views, shared in plan for view in views[shared:]]
            assert new == list(range(num_views)), "every view is reconstructed first by exactly one chunk, in order"
            assert all(len(views) == min(chunk_size, num_views) for views, _ in plan)
            assert len(plan) == number_of_chunks(num_views, chunk_size, overlap)
            assert all(shared >= overlap for _, shared in plan[1:])


@pytest.mark.parametrize(
    ("chunk_size", "overlap", "message"),
    [
        (1, 1, "chunk_size must be at least 2 views, got 1"),
        (4, 0, "overlap must be at least 1 view .* less than chunk_size=4, got 0"),
        (4, 4, "overlap must be at least 1 view .* less than chunk_size=4, got 4"),
        (4.0, 2, r"chunk_size must be an integer number of views, got 4\.0"),
        (4, "2", "overlap must be an integer number of views, got '2'"),
    ],
)
def test_chunk_settings_outside_the_plan_are_refused(chunk_size, overlap, message):
    with pytest.raises(ValueError, match=message):
        list(plan_chunks(range(10), chunk_size, overlap))


def test_numpy_integers_plan_as_ints_and_the_alignment_needs_three_points():
    assert list(plan_chunks(range(5), np.int64(4), np.int64(2))) == list(plan_chunks(range(5), 4, 2))
    for bad in (0, 2, 2.5):  # 0 failed later with "points are missing or non-finite", not the cause
        with pytest.raises(ValueError, match=rf"max_alignment_points must be an integer of at least 3 .*got {bad}"):
            list(stream_reconstruction(FakeModel(Walk(8)), index_processor, range(8), 4, 2, max_alignment_points=bad))


def test_views_are_read_lazily():
    read = []

    def views():
        for index in range(100):
            read.append(index)
            yield index

    chunks = plan_chunks(views(), chunk_size=10, overlap=4)
    next(chunks)
    assert len(read) == 10
    next(chunks)
    assert len(read) == 16


def test_the_next_chunk_is_queued_on_the_device_before_the_previous_is_handed_out():
    # the host's work on chunk k (alignment, and the caller's: writing files) overlaps the device's on chunk k + 1
    walk, events = Walk(40), []
    model = FakeModel(walk)
    reconstruct = model.reconstruct

    def recording(geometry_pixel_values, **kwargs):
        events.append(("queued", int(geometry_pixel_values[0, 0, 0, 0, 0])))
        return reconstruct(geometry_pixel_values, **kwargs)

    model.reconstruct = recording
    chunks = []
    for chunk in stream_reconstruction(model, index_processor, range(40), chunk_size=10, overlap=4):
        events.append(("handed out", chunk.view_indices.start))
        chunks.append(chunk)
    plan = list(plan_chunks(range(40), 10, 4))
    expected = [("queued", plan[0][0][0])]
    for (views, _), chunk in zip(plan[1:], chunks, strict=False):
        expected += [("queued", views[0]), ("handed out", chunk.view_indices.start)]
    expected.append(("handed out", chunks[-1].view_indices.start))
    assert events == expected
    merged = merge_chunks(chunks)
    assert trajectory_error(merged.camera_poses[0], walk.poses) < 1e-4  # and still aligned, to float32 precision


def test_a_loop_window_is_centred_on_its_view_unless_the_sequence_ends():
    for num_views in range(1, 30):
        for window in range(1, 12):
            for view in range(num_views):
                places = place_window(view, window, num_views)
                assert view in places and len(places) == min(window, num_views)
                assert places.start >= 0 and places.stop <= num_views
                if window // 2 <= view <= num_views - window + window // 2:  # room on both sides
                    assert places.start == view - window // 2
                else:
                    assert places.start == 0 or places.stop == num_views


def test_each_alignment_fits_at_most_max_alignment_points_of_the_shared_pixels(monkeypatch):
    walk = Walk(40)
    fitted = []

    def counting(source, target, weights=None):
        fitted.append(source.shape[0])
        return robust_umeyama(source, target, weights)

    monkeypatch.setattr(chunked, "robust_umeyama", counting)
    shared = 4 * HEIGHT * WIDTH  # 192 pixels in the 4 views two chunks share
    for limit, expected in ((100, 100), (10_000, shared)):
        fitted.clear()
        views = range(40)
        chunks = list(stream_reconstruction(FakeModel(walk), index_processor, views, 10, 4, max_alignment_points=limit))
        assert fitted == [expected] * 2 * (len(chunks) - 1)  # world points, then the global head's points
        assert trajectory_error(merge_chunks(chunks).camera_poses[0], walk.poses) < 1e-4


def test_the_aligner_refuses_what_it_cannot_chain():
    walk = Walk(12)
    model = FakeModel(walk)
    first, second = (
        model.reconstruct(index_processor(list(views))["geometry_pixel_values"])
        for views in (range(0, 6), range(4, 10))
    )
    with pytest.raises(ValueError, match="one scene at a time, got a batch of 2"):
        ChunkAligner().add(G2VLMReconstructionOutput(**{k: torch.cat([v, v]) for k, v in first.items()}), 0)
    with pytest.raises(ValueError, match="first chunk cannot share views"):
        ChunkAligner().add(first, 2)
    aligner = ChunkAligner()
    aligner.add(first, 0)
    with pytest.raises(ValueError, match="share at least one view of the same size"):
        aligner.add(second, 0)
    smaller = G2VLMReconstructionOutput(**{k: v[:, :, :4] if v.dim() > 4 else v for k, v in second.items()})
    with pytest.raises(ValueError, match=r"sizes \(4, 8\) and \(6, 8\)\. .*resize_views_to_first=True"):
        aligner.add(smaller, 2)  # the sizes named are (height, width) of the new and the previous chunk
    aligned, _, error = aligner.add(second, 2)
    assert error < 1e-6 and len(aligned.world_points[0]) == 6
    with pytest.raises(ValueError, match="No chunks to merge"):
        merge_chunks([])


@pytest.mark.parametrize(("chunk_size", "overlap"), [(1, 0), (8, 0), (8, 8), (8, -1)])
def test_bad_chunking_is_refused(chunk_size, overlap):
    with pytest.raises(ValueError, match=r"chunk_size|overlap"):
        list(plan_chunks(range(20), chunk_size, overlap))


# -------------------------------------------------------------------------------------------------- similarity fit


def test_weighted_umeyama_equals_repeating_the_points():
    rng = np.random.default_rng(0)
    source, target = torch.from_numpy(rng.normal(size=(30, 3))), torch.from_numpy(rng.normal(size=(30, 3)))
    weights = torch.from_numpy(rng.integers(1, 4, 30)).double()
    repeated = torch.repeat_interleave(torch.arange(30), weights.long())
    weighted, plain = umeyama(source, target, weights), umeyama(source[repeated], target[repeated])
    assert weighted[0] == pytest.approx(plain[0], rel=1e-10)
    torch.testing.assert_close(weighted[1], plain[1])
    torch.testing.assert_close(weighted[2], plain[2])


def test_umeyama_is_exact_from_three_points_and_refuses_bad_weights():
    rng = np.random.default_rng(3)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(3, 3)))  # the fewest points that fix a similarity
    scale, rotation, translation = umeyama(source, truth.apply(source))
    assert scale == pytest.approx(truth.scale, rel=1e-10)
    torch.testing.assert_close(rotation, truth.rotation)
    torch.testing.assert_close(translation, truth.translation)
    torch.testing.assert_close(torch.det(rotation), torch.tensor(1.0, dtype=torch.float64))
    source = torch.from_numpy(rng.normal(size=(6, 3)))
    target = truth.apply(source)
    for weights in ([1.0, 1, 1, 1, 1, -1], [1.0, 1, 1, 1, 1, float("nan")], [1.0, 1, 1, 1, 1]):
        with pytest.raises(ValueError, match="weights must be 6 finite non-negative numbers"):
            umeyama(source, target, torch.tensor(weights))
    with pytest.raises(ValueError, match="at least 3 corresponding points of positive weight, got 2"):
        umeyama(source, target, torch.tensor([1.0, 1, 0, 0, 0, 0]))


def test_a_similarity_built_from_any_numbers_composes_and_applies():
    """float32 or NumPy parts (as a user builds one) are held in float64: composing with a fitted one failed on the
    dtypes, and integer points were moved by a rotation cast to integers."""
    built = Similarity(np.float32(2.0), torch.eye(3), np.array([1, 0, 0]))
    composed = built.compose(Similarity.identity()).compose(built.inverse())
    torch.testing.assert_close(composed.rotation, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(composed.translation, torch.zeros(3, dtype=torch.float64))
    assert composed.scale == 1.0
    quarter = Similarity(1.0, torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.zeros(3))
    torch.testing.assert_close(quarter.apply(torch.tensor([[1, 2, 3]])), torch.tensor([[-2.0, 1.0, 3.0]]))
    scale, _, _ = umeyama(np.eye(3)[::-1] * 2.0, np.eye(3)[::-1] * 4.0)  # a reversed (negative-stride) view
    assert scale == pytest.approx(2.0)


def test_umeyama_leaves_out_points_of_weight_zero_even_when_they_are_not_finite():
    """A mask given as weights: the masked points (NaN, or far off) change nothing; a NaN point of positive weight and
    a cloud that all coincides are refused."""
    rng = np.random.default_rng(4)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(40, 3)))
    target = truth.apply(source)
    weights = torch.ones(40, dtype=torch.float64)
    source[5], target[6], target[7], weights[5:8] = float("nan"), float("inf"), 1e12, 0.0
    scale, rotation, translation = umeyama(source, target, weights)
    assert scale == pytest.approx(truth.scale, rel=1e-10)
    torch.testing.assert_close(rotation, truth.rotation)
    torch.testing.assert_close(translation, truth.translation)
    with pytest.raises(ValueError, match="NaN or Inf points of positive weight: give them weight 0"):
        umeyama(source, target)
    with pytest.raises(ValueError, match="The source or the target points all coincide"):
        umeyama(source[8:], torch.ones(32, 3, dtype=torch.float64))  # the least-squares scale would be 0


def test_a_small_scan_far_from_the_origin_is_fitted_not_called_coinciding():
    """A 2 m scan in UTM coordinates (4,000 km from the origin, float64 keeps it to a nanometre) aligned to the
    prediction's frame: the similarity is recovered by both fits (it was refused as points that all coincide)."""
    rng = np.random.default_rng(11)
    truth = random_similarity(rng)
    utm = torch.tensor([512_345.0, 4_012_345.0, 120.0], dtype=torch.float64)
    source = torch.from_numpy(rng.normal(size=(300, 3))) + utm
    target = truth.apply(source)
    scale, rotation, _ = umeyama(source, target)
    assert scale == pytest.approx(truth.scale, rel=1e-6)
    torch.testing.assert_close(rotation, truth.rotation, atol=1e-6, rtol=0)
    fit = robust_umeyama(source, target)
    torch.testing.assert_close(fit.apply(source), target, atol=1e-4 * truth.scale, rtol=0)


@pytest.mark.parametrize("cloud", ["source", "target"])
def test_robust_fit_refuses_a_cloud_half_of_which_sits_on_one_point(cloud):
    """Invalid pixels unprojected to (0, 0, 0): under half of them are outliers like any other, half or more left
    only the coinciding points after the far-point filter (a scale of 0 without an error, for the target)."""
    rng = np.random.default_rng(5)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(1000, 3))) + torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)
    target = truth.apply(source)
    zeroed = {"source": source.clone(), "target": target.clone()}
    zeroed[cloud][:300] = 0.0
    fit = robust_umeyama(zeroed["source"], zeroed["target"])
    assert fit.scale == pytest.approx(truth.scale, rel=1e-9)
    zeroed[cloud][:550] = 0.0
    with pytest.raises(ValueError, match=f"Half or more of the {cloud} points .* coincide at one point"):
        robust_umeyama(zeroed["source"], zeroed["target"])
    weights = torch.ones(1000, dtype=torch.float64)
    weights[:550] = 0.0  # given weight 0, they are left out
    assert robust_umeyama(zeroed["source"], zeroed["target"], weights).scale == pytest.approx(truth.scale, rel=1e-9)


def test_robust_fit_ignores_outliers_and_non_finite_points():
    rng = np.random.default_rng(1)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(2000, 3)))
    target = truth.apply(source) + torch.from_numpy(rng.normal(0, 0.01, (2000, 3)))
    target[:200] += torch.from_numpy(rng.normal(0, 100, (200, 3)))  # 10 % gross outliers
    source[200:210] = float("nan")
    target[210:220] = float("inf")
    fit = robust_umeyama(source, target)
    assert fit.scale == pytest.approx(truth.scale, rel=2e-3)
    torch.testing.assert_close(fit.rotation, truth.rotation, atol=2e-3, rtol=0)
    finite = torch.cat([torch.arange(200), torch.arange(220, 2000)])
    plain = Similarity(*umeyama(source[finite], target[finite]))
    # the least-squares fit is pulled far off by the same outliers
    assert abs(plain.scale - truth.scale) > 20 * abs(fit.scale - truth.scale)


@pytest.mark.parametrize("cloud", ["source", "target", "both"])
@pytest.mark.parametrize("distance", [1e6, 1e12])
def test_points_far_beyond_the_scene_are_dropped_before_the_fit(cloud, distance):
    """A tenth of the points a million times (or more) farther than the scene, as depth blown up at the sky or a
    window gives: in the source they dwarf the scene's spread, so that without the far-point filter the fit took the
    source for one point ("all coincide") and failed."""
    rng = np.random.default_rng(7)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(2000, 3)))
    target = truth.apply(source) + torch.from_numpy(rng.normal(0, 0.01, (2000, 3)))
    far = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(200, 3))), dim=1) * distance
    if cloud in ("source", "both"):
        source[:200] = far * torch.from_numpy(rng.uniform(1, 2, (200, 1)))
    if cloud in ("target", "both"):
        target[:200] = far * torch.from_numpy(rng.uniform(1, 2, (200, 1)))
    fit = robust_umeyama(source, target)
    assert fit.scale == pytest.approx(truth.scale, rel=1e-3)
    torch.testing.assert_close(fit.rotation, truth.rotation, atol=1e-3, rtol=0)


def test_correspondences_beyond_six_sigma_have_no_influence():
    # Tukey's cut-off is 6 sigma, sigma read off the median residual norm (/ 1.5382): a tenth of the points moved by
    # 9 sigma, one way (inside the scene, so no far-point filter), leave the fit where the other points alone put it;
    # they pull least squares by about 0.9 sigma (a cut-off at 14 sigma, sigma taken as the median norm, by 0.5).
    rng = np.random.default_rng(4)
    truth = random_similarity(rng)
    count, sigma = 2000, 0.01
    source = torch.from_numpy(rng.normal(size=(count, 3)))
    target = truth.apply(source) + torch.from_numpy(rng.normal(0, sigma, (count, 3)))
    target[: count // 10, 0] += 9 * sigma
    inliers = Similarity(*umeyama(source[count // 10 :], target[count // 10 :]))

    def distance(fit: Similarity) -> float:
        return float((fit.apply(source) - inliers.apply(source)).norm(dim=1).max())

    assert distance(robust_umeyama(source, target)) < 0.1 * sigma
    assert distance(Similarity(*umeyama(source, target))) > 0.5 * sigma


def test_the_robust_fit_needs_three_usable_correspondences_and_is_exact_with_them():
    rng = np.random.default_rng(5)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(6, 3)))
    target = truth.apply(source)
    weights = torch.tensor([1.0, 2.0, 0.5, 0.0, 0.0, 1.0])
    target[5] = float("nan")  # three usable correspondences: weights 1, 2 and 0.5
    fit = robust_umeyama(source, target, weights)
    assert fit.scale == pytest.approx(truth.scale, rel=1e-9)
    torch.testing.assert_close(fit.rotation, truth.rotation)
    with pytest.raises(ValueError, match="Only 0 of 6 correspondences are usable"):
        robust_umeyama(source, target, torch.zeros(6))  # zero weights are no correspondences


def test_confidence_weights_remove_even_a_majority_of_outliers():
    rng = np.random.default_rng(2)
    truth = random_similarity(rng)
    source = torch.from_numpy(rng.normal(size=(1000, 3)))
    target = truth.apply(source)
    target[:600] = torch.from_numpy(rng.normal(0, 30, (600, 3)))
    weights = torch.ones(1000, dtype=torch.float64)
    weights[:600] = 0
    fit = robust_umeyama(source, target, weights)
    assert fit.scale == pytest.approx(truth.scale, rel=1e-9)
    torch.testing.assert_close(fit.translation, truth.translation)


def test_degenerate_overlaps_give_clear_errors():
    points = torch.ones(50, 3)
    with pytest.raises(ValueError, match="coincide"):
        robust_umeyama(points, points)
    nan = torch.full((50, 3), float("nan"))
    with pytest.raises(ValueError, match="Only 0 of 50 correspondences are usable"):
        robust_umeyama(nan, nan)
    with pytest.raises(ValueError, match=r"\(M, 3\)"):
        robust_umeyama(torch.zeros(5, 2), torch.zeros(5, 2))


def test_transforming_a_reconstruction_keeps_its_invariants():
    walk = Walk(5)
    world = world_from(walk.poses, walk.local)
    prediction = G2VLMReconstructionOutput(camera_poses=walk.poses[None], local_points=walk.local[None],
                                           world_points=world[None], depth=walk.local[None, ..., 2])  # fmt: skip
    similarity = random_similarity(np.random.default_rng(3))
    moved = transform_reconstruction(prediction, similarity)
    rotations = moved.camera_poses[0, :, :3, :3]
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(5, 3, 3))
    torch.testing.assert_close(world_from(moved.camera_poses[0], moved.local_points[0]), moved.world_points[0])
    torch.testing.assert_close(moved.world_points[0], similarity.apply(world))
    torch.testing.assert_close(moved.depth, moved.local_points[..., 2])


# ------------------------------------------------------------------------------------- merged synthetic trajectories


@pytest.mark.parametrize("num_views", [50, 400])
def test_noise_free_chunks_merge_without_drift(num_views):
    walk = Walk(num_views)
    model = FakeModel(walk)
    merged = merged_walk(walk, model)
    assert merged.camera_poses.shape == (1, num_views, 4, 4)
    assert len(model.frames) == number_of_chunks(num_views, 32, 8)
    # in the first chunk's frame: the truth moved by that chunk's similarity, to float32 precision, at any length
    expected = model.frames[0].apply_to_poses(walk.poses)
    torch.testing.assert_close(merged.camera_poses[0].double(), expected, atol=2e-4 * model.frames[0].scale, rtol=1e-4)
    assert trajectory_error(merged.camera_poses[0], walk.poses) < 1e-4
    torch.testing.assert_close(merged.world_points[0].double(), model.frames[0].apply(world_from(walk.poses, walk.local)),
                               atol=2e-4 * model.frames[0].scale, rtol=1e-4)  # fmt: skip


def test_noisy_chunks_merge_to_the_noise_level():
    walk = Walk(400)
    noise = 0.01  # the walk spans about 40 units
    model = FakeModel(walk, rotation_noise=0.002, translation_noise=noise, depth_noise=0.01)
    error = trajectory_error(merged_walk(walk, model).camera_poses[0], walk.poses)
    per_view = math.sqrt(3) * noise  # RMSE of the position noise itself
    assert error < 2.0 * per_view, f"ATE {error:.4f} vs per-view noise {per_view:.4f}"


def test_outliers_in_the_overlap_do_not_break_the_chain():
    walk = Walk(200)
    model = FakeModel(walk, translation_noise=0.005, outlier_share=0.1)
    error = trajectory_error(merged_walk(walk, model).camera_poses[0], walk.poses)
    assert error < 2.0 * math.sqrt(3) * 0.005


def test_confidence_flags_outliers_for_the_alignment():
    walk = Walk(200)
    model = FakeModel(walk, outlier_share=0.6, flag_outliers=True)  # more outliers than a robust loss can handle
    assert trajectory_error(merged_walk(walk, model).camera_poses[0], walk.poses) < 1e-3


def test_global_points_are_aligned_in_their_own_frame():
    walk = Walk(100)
    model = FakeModel(walk)
    merged = merged_walk(walk, model, chunk_size=16, overlap=4)
    expected = model.global_frames[0].apply(world_from(walk.poses, walk.local))
    scale = model.global_frames[0].scale
    torch.testing.assert_close(merged.global_points[0].double(), expected, atol=1e-3 * scale, rtol=1e-4)


@pytest.mark.parametrize("views", ["photos/", Path("photos"), b"photos"], ids=["str", "path", "bytes"])
def test_a_single_path_is_not_read_as_views(views):
    """A string is iterable: without the check its letters became views (and a progress bar of 0/7 chunks)."""
    model = FakeModel(Walk(4))
    for call in (
        lambda: list(stream_reconstruction(model, index_processor, views, 4, 2)),
        lambda: reconstruct_chunked(model, index_processor, views, 4, 2),
        lambda: reconstruct_chunked(model, index_processor, views, 4, 2, loop_closure=True),
    ):
        with pytest.raises(ValueError, match=r"got the single path 'photos/?'; for a folder of images pass"):
            call()
    assert model.frames == []  # the model never ran


def test_the_progress_bar_counts_chunks_out_of_the_known_total(capsys):
    """The total (for an ETA) comes from len(views), else from total_views; a generator of unknown length still
    counts its chunks."""
    model = FakeModel(Walk(11))
    expected = number_of_chunks(11, 4, 2)
    for views, total_views, shown in (
        (range(11), None, f"{expected}/{expected}"),
        ((view for view in range(11)), 11, f"{expected}/{expected}"),
        ((view for view in range(11)), None, f"{expected}chunk"),
    ):
        capsys.readouterr()
        chunks = list(stream_reconstruction(model, index_processor, views, 4, 2, total_views=total_views))
        err = capsys.readouterr().err
        assert len(chunks) == expected and "Reconstructing chunks" in err and shown in err, err
        if total_views is None and not isinstance(views, range):
            assert f"/{expected}" not in err


def test_a_chunk_anchor_is_its_camera_centre_and_point_spread_in_its_own_frame():
    """The pose graph's gauge for a chunk (loop closure): in the chunk's own (unaligned) frame, the origin at the
    median camera centre and the unit the median distance of the points from their median. The optimum does not
    depend on it, only how well the solver is conditioned, so it is checked here, on a chunk of known geometry."""
    centre = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)
    cameras = torch.eye(4, dtype=torch.float64).repeat(5, 1, 1)
    cameras[:, :3, 3] = centre + torch.arange(-2.0, 3.0, dtype=torch.float64)[:, None] * torch.tensor([1.0, 0, 0])
    offsets = 2.0 * torch.cat([torch.eye(3), -torch.eye(3)]).double()  # six points 2 from the centre
    points = (centre + offsets).expand(5, 1, 6, 3)
    alignment = random_similarity(np.random.default_rng(7))
    aligned = G2VLMReconstructionOutput(
        camera_poses=alignment.apply_to_poses(cameras)[None].float(),
        world_points=alignment.apply(points.reshape(-1, 3)).reshape(1, 5, 1, 6, 3).float(),
    )
    chunk = chunked.ReconstructedChunk(3, range(10, 15), aligned, torch.zeros(1, 5, 3, 14, 14), alignment, 0.0)
    anchor = chunked.chunk_anchor(chunk)
    torch.testing.assert_close(anchor.translation, centre, atol=1e-5, rtol=0)
    assert anchor.scale == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(anchor.rotation, torch.eye(3, dtype=torch.float64))
