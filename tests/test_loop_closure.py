"""Loop closure of chunked reconstruction on synthetic trajectories that revisit their start, with a stand-in model
(`synthetic_trajectories.StandInModel`) whose every chunk drifts (each step between consecutive views biased by a
rotation and a scale error), plus noise; and the pieces on their own: candidates, the pose graph, the checks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from synthetic_trajectories import LoopTrajectory, StandInModel, index_processor, random_similarity, relative_ate
from transformers.utils import logging

from g2vlm_hf.chunked import (
    LoopClosureConfig,
    close_loops,
    merge_chunks,
    reconstruct_chunked,
    stream_reconstruction,
)
from g2vlm_hf.loop_closure import PoseGraphEdge, co_visible_share, find_loop_candidates, optimise_pose_graph
from g2vlm_hf.similarity import Similarity, umeyama

pytest.importorskip("scipy", reason="loop closure needs scipy (the loop extra, part of the test extras)")

CHUNK, OVERLAP = 16, 4


def drift(num_views: int) -> dict:
    """A drift of 0.6 rad and 0.4 log-scale over the whole loop, spread over its steps."""
    return dict(drift_rotation=0.6 / num_views, drift_scale=0.4 / num_views)


DRIFT = drift(200)


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def ate(trajectory: LoopTrajectory, loop_closure, **model_options) -> float:
    model = StandInModel(trajectory, **model_options)
    views = range(trajectory.num_views)
    merged = reconstruct_chunked(model, index_processor, views, CHUNK, OVERLAP, loop_closure=loop_closure)
    return relative_ate(merged.camera_poses[0], trajectory)


@pytest.mark.parametrize("num_views", [200, 500])
def test_loop_closure_removes_the_drift_of_a_revisiting_trajectory(num_views):
    trajectory = LoopTrajectory(num_views)
    drifting = ate(trajectory, False, noise=0.002, **drift(num_views))
    closed = ate(trajectory, True, noise=0.002, **drift(num_views))
    noise_only = ate(trajectory, False, noise=0.002)
    # measured: 200 views 0.090 -> 0.0067 (noise alone 0.0044); 500 views 0.22 -> 0.0065 (noise alone 0.0059)
    assert closed < 0.1 * drifting, f"ATE {closed:.2e} with loop closure vs {drifting:.2e} without"
    assert closed < 2.0 * noise_only, f"ATE {closed:.2e} with loop closure vs {noise_only:.2e} for the noise alone"


def test_loop_closure_keeps_outliers_out():
    trajectory = LoopTrajectory(200)
    closed = ate(trajectory, True, noise=0.002, outlier_share=0.1, **DRIFT)
    assert closed < 2.0 * ate(trajectory, False, noise=0.002)


def test_an_exact_chain_stays_exact():
    trajectory = LoopTrajectory(200)
    model = StandInModel(trajectory)
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    closed, loops = close_loops(model, index_processor, range(200), chunks)
    assert len(loops) >= 1 and loops[0].chunks == (0, len(chunks) - 1)
    assert len(model.calls) == len(chunks) + len(loops)  # one pair chunk per verified candidate
    assert relative_ate(merge_chunks(closed).camera_poses[0], trajectory) < 1e-5
    for before, after in zip(chunks, closed, strict=True):
        torch.testing.assert_close(after.reconstruction.world_points, before.reconstruction.world_points,
                                   atol=1e-4 * before.similarity.scale, rtol=1e-4)  # fmt: skip


def test_no_revisit_no_change():
    trajectory = LoopTrajectory(400)  # the first half of the circle: nothing is seen twice
    model = StandInModel(trajectory, **drift(400))
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    closed, loops = close_loops(model, index_processor, range(200), chunks)
    assert loops == [] and len(model.calls) == len(chunks)
    assert all(after is before for after, before in zip(closed, chunks, strict=True))


def test_a_look_alike_of_another_place_is_rejected_by_the_pair_chunk():
    trajectory = LoopTrajectory(400)
    model = StandInModel(trajectory, **DRIFT)
    tokens = model.model.geometry_encoder.tokens
    tokens[150] = tokens[40]  # perceptual aliasing: view 150 looks like view 40, 100 degrees away
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    closed, loops = close_loops(model, index_processor, range(200), chunks)
    assert len(model.calls) == len(chunks) + 1  # the candidate was verified ...
    assert loops == [] and all(after is before for after, before in zip(closed, chunks, strict=True))  # ... and refused
    # with the co-visibility check off, the same candidate would have been kept and bent the chain
    _, accepted = close_loops(model, index_processor, range(200), chunks, LoopClosureConfig(min_co_visible=0.0))
    assert [(loop.candidate.first, loop.candidate.second) for loop in accepted] == [(40, 150)]


def test_candidates_skip_temporal_neighbours_and_suppress_duplicates():
    rng = np.random.default_rng(0)
    places = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(100, 32))).float(), dim=1)
    descriptors = places.clone()
    descriptors[1:] = torch.nn.functional.normalize(places[1:] + 0.3 * places[:-1], dim=1)  # neighbours are alike
    descriptors[80:84] = descriptors[10:14]  # views 80..83 revisit views 10..13
    candidates = find_loop_candidates(descriptors, min_separation=20, suppression=8, threshold=0.9, max_loops=10)
    # the four matching pairs fall in one suppression block; neighbours (similar, but closer than 20) are no loops
    assert [(c.first, c.second) for c in candidates] == [(10, 80)]
    assert find_loop_candidates(descriptors, min_separation=100, suppression=8, threshold=0.9, max_loops=10) == []


def test_a_non_finite_descriptor_only_loses_its_own_view():
    """One NaN descriptor (e.g. a view whose tokens overflowed in float16) made the best score of every view that could
    pair with it NaN, and every loop was lost."""
    rng = np.random.default_rng(1)
    descriptors = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(50, 32))).float(), dim=1)
    descriptors[45], descriptors[47] = descriptors[3], descriptors[20]
    expected = [(3, 45), (20, 47)]
    assert [(c.first, c.second) for c in find_loop_candidates(descriptors, 10, 5, 0.8, 10)] == expected
    descriptors[49] = float("nan")
    assert [(c.first, c.second) for c in find_loop_candidates(descriptors, 10, 5, 0.8, 10)] == expected
    with pytest.raises(ValueError, match="min_separation must be at least 1 view"):
        find_loop_candidates(descriptors, 0, 5, 0.8, 10)  # each view would be its own best partner


def test_candidates_refuse_descriptors_that_are_not_one_tensor_row_per_view():
    descriptors = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    with pytest.raises(TypeError, match=r"`descriptors` must be a torch.Tensor, got ndarray \(from NumPy"):
        find_loop_candidates(descriptors.numpy(), 10, 5, 0.8, 10)
    with pytest.raises(ValueError, match=r"`descriptors` must be \(views, dim\).*\(2, 30, 8\)"):
        find_loop_candidates(torch.stack([descriptors, descriptors]), 10, 5, 0.8, 10)


def brute_force_candidates(descriptors, min_separation, suppression, threshold, max_loops) -> list[tuple[int, int]]:
    """The candidates as the module docstring defines them, from the whole similarity matrix, one pair at a time."""
    scores = (descriptors.double() @ descriptors.double().T).numpy()
    best = []
    for first in range(len(scores)):
        partners = range(first + min_separation, len(scores))
        if partners:
            second = max(partners, key=lambda other: scores[first, other])
            if scores[first, second] >= threshold:
                best.append((first, second))
    best.sort(key=lambda pair: -scores[pair])
    kept = []
    for first, second in best:
        if all(abs(first - a) >= suppression or abs(second - b) >= suppression for a, b in kept):
            kept.append((first, second))
    return kept[:max_loops]


def test_candidates_equal_a_brute_force_search_across_row_blocks():
    """2,100 views: the similarity matrix is computed in blocks of 1,024 rows; loops planted at the blocks' edges, at
    exactly the least separation (and one view short of it), and two within one suppression block."""
    rng = np.random.default_rng(3)
    descriptors = torch.from_numpy(rng.normal(size=(2100, 64)))
    separation, suppression = 40, 8
    plants = [
        (1023, 1023 + separation),
        (1024, 1900),
        (0, 2099),
        (2047, 2047 + separation),
        (2048, 2095),
        (500, 1600),
        (503, 1602),
        (1200, 1200 + separation - 1),
    ]
    for number, (first, second) in enumerate(plants):
        descriptors[second] = descriptors[first] + 0.02 * (1 + number) * torch.from_numpy(rng.normal(size=64))
    descriptors = torch.nn.functional.normalize(descriptors, dim=1).float()
    for max_loops in (32, 3):
        found = find_loop_candidates(descriptors, separation, suppression, 0.9, max_loops)
        expected = brute_force_candidates(descriptors, separation, suppression, 0.9, max_loops)
        assert [(c.first, c.second) for c in found] == expected
    assert expected == plants[:3] and len(found) == 3
    pairs = [(c.first, c.second) for c in find_loop_candidates(descriptors, separation, suppression, 0.9, 32)]
    assert set(plants[:5]) < set(pairs) and len(pairs) == 6  # one of the twins within a suppression block is kept,
    assert len(set(pairs) & set(plants[5:7])) == 1 and plants[7] not in pairs  # and the too-close pair is ignored


def test_the_co_visible_share_is_the_share_of_the_second_place_lying_on_the_first():
    rng = np.random.default_rng(4)
    rows, columns = torch.meshgrid(torch.arange(50.0), torch.arange(60.0), indexing="ij")
    wall = torch.stack([columns / 60, rows / 50, torch.zeros_like(rows)], dim=-1).reshape(-1, 3).double()
    seen_again = wall + torch.from_numpy(rng.uniform(-0.004, 0.004, wall.shape))  # the wall seen by other views
    elsewhere = seen_again + torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)
    assert co_visible_share(wall, seen_again, sample=3000) == 1.0
    assert co_visible_share(wall, elsewhere, sample=3000) == 0.0
    order = torch.from_numpy(rng.permutation(3000))
    for share in (0.25, 0.6):  # part of the second place on the wall, the rest elsewhere
        on_wall = torch.zeros(3000, dtype=torch.bool)
        on_wall[order[: int(share * 3000)]] = True
        second = torch.where(on_wall[:, None], seen_again, elsewhere)
        assert co_visible_share(wall, second, sample=3000) == pytest.approx(share, abs=1e-9)
        assert co_visible_share(wall, second) == pytest.approx(share, abs=0.03)  # 2,000 of each sampled
    gaps = torch.cat([torch.full((500, 3), float("nan")), torch.full((500, 3), float("inf"))])
    assert co_visible_share(wall, torch.cat([seen_again, gaps]), sample=3000) == 1.0  # non-finite points are none
    assert co_visible_share(torch.cat([wall[:1], gaps]), seen_again) == 0.0  # one point: no spacing to measure
    clamped = torch.cat([wall, torch.zeros(4000, 3, dtype=torch.float64)])  # most pixels clamped to one point
    assert co_visible_share(clamped, seen_again, sample=7000) == 1.0  # the spacing is the wall's, not 0
    assert co_visible_share(torch.ones(50, 3), seen_again) == 0.0  # one place only
    assert co_visible_share(wall, gaps) == 0.0  # nothing to place


def test_the_pose_graph_recovers_consistent_similarities_from_a_drifted_start():
    rng = np.random.default_rng(5)
    truth = [Similarity.identity()] + [random_similarity(rng) for _ in range(11)]
    pairs = [(i - 1, i) for i in range(1, 12)] + [(0, 11), (2, 9)]  # a chain and two loops
    edges = [PoseGraphEdge(i, j, truth[i].inverse().compose(truth[j])) for i, j in pairs]
    turn = torch.from_numpy(_rotation([0.0, 0.1, 0.0]))
    drift = Similarity(1.05, turn, torch.tensor([0.2, 0.0, 0.1], dtype=torch.float64))
    start = [truth[0]] + [truth[i].compose(drift) for i in range(1, 12)]  # every chunk off
    anchors = [Similarity(2.0, torch.eye(3, dtype=torch.float64), torch.from_numpy(rng.normal(size=3))) for _ in truth]
    solved = optimise_pose_graph(start, edges, anchors)
    for got, expected in zip(solved, truth, strict=True):
        assert got.scale == pytest.approx(expected.scale, rel=1e-6)
        torch.testing.assert_close(got.rotation, expected.rotation, atol=1e-6, rtol=0)
        tolerance = 1e-5 * (1 + float(expected.translation.norm()))
        torch.testing.assert_close(got.translation, expected.translation, atol=tolerance, rtol=0)


def test_the_pose_graph_checks_its_edges_and_anchors_and_leaves_a_graph_without_edges_alone():
    rng = np.random.default_rng(6)
    start = [Similarity.identity()] + [random_similarity(rng) for _ in range(3)]
    anchors = [Similarity.identity()] * 4
    assert optimise_pose_graph(start, [], anchors) == start
    assert optimise_pose_graph(start[:1], [PoseGraphEdge(0, 0, Similarity.identity())], anchors[:1]) == start[:1]
    (_, moved) = optimise_pose_graph(start[:2], [PoseGraphEdge(0, 1, start[3])], anchors[:2])  # two chunks: solved
    assert moved.scale == pytest.approx(start[3].scale, rel=1e-9)
    torch.testing.assert_close(moved.translation, start[3].translation)
    for reference, moving in ((0, 4), (-1, 2)):
        with pytest.raises(ValueError, match=r"join chunks 0\.\.3"):
            optimise_pose_graph(start, [PoseGraphEdge(reference, moving, Similarity.identity())], anchors)
    with pytest.raises(ValueError, match=r"one anchor per chunk \(4\), got 3"):
        optimise_pose_graph(start, [PoseGraphEdge(0, 1, Similarity.identity())], anchors[:3])


def _rotation(vector) -> np.ndarray:
    angle = np.linalg.norm(vector)
    axis = np.asarray(vector) / angle
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def test_loop_closure_needs_a_sequence_and_descriptors():
    trajectory = LoopTrajectory(40)
    model = StandInModel(trajectory)
    with pytest.raises(ValueError, match="sequence"):
        reconstruct_chunked(model, index_processor, iter(range(40)), CHUNK, OVERLAP, loop_closure=True)
    chunks = list(stream_reconstruction(model, index_processor, range(40), CHUNK, OVERLAP))
    with pytest.raises(ValueError, match="describe_views=True"):
        close_loops(model, index_processor, range(40), chunks)


def test_a_clear_error_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ImportError, match=r'pip install "g2vlm-hf\[loop\]"'):
        reconstruct_chunked(
            StandInModel(LoopTrajectory(40)), index_processor, range(40), CHUNK, OVERLAP, loop_closure=True
        )


BAD_SETTINGS = [
    dict(similarity_threshold=1.0001),
    dict(similarity_threshold=-1.0001),
    dict(min_separation=0),
    dict(suppression=0),
    dict(window=0),
    dict(max_loops=-1),
    dict(loop_weight=0.0),
    dict(min_co_visible=-0.01),
    dict(min_co_visible=1.01),
]


@pytest.mark.parametrize("options", BAD_SETTINGS)
def test_bad_settings_are_refused(options):
    (name,) = options
    with pytest.raises(ValueError, match=name):
        LoopClosureConfig(**options)


@pytest.mark.parametrize(
    "options",
    [
        dict(similarity_threshold=1.0),
        dict(similarity_threshold=-1.0),
        dict(min_separation=1, suppression=1, window=1),
        dict(max_loops=0),
        dict(min_co_visible=0.0),
        dict(min_co_visible=1.0),
        dict(loop_weight=1e-9),
    ],
)
def test_the_edges_of_the_settings_are_accepted(options):
    config = LoopClosureConfig(**options)
    assert all(getattr(config, name) == value for name, value in options.items())


class NoisyPairChunks(StandInModel):
    """Exact for the stream's chunks (consecutive views); `pair_noise` on every pair chunk of loop verification."""

    def __init__(self, trajectory: LoopTrajectory, pair_noise: float, **options):
        super().__init__(trajectory, **options)
        self.pair_noise = pair_noise

    def reconstruct(self, geometry_pixel_values: torch.Tensor, **kwargs):
        index = geometry_pixel_values[0, :, 0, 0, 0]
        self.noise = self.pair_noise if bool((index.diff() != 1).any()) else 0.0
        return super().reconstruct(geometry_pixel_values, **kwargs)


def test_a_pair_chunk_that_aligns_badly_onto_the_chain_is_rejected():
    trajectory = LoopTrajectory(200)
    model = NoisyPairChunks(trajectory, pair_noise=0.05, **DRIFT)
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    closed, loops = close_loops(model, index_processor, range(200), chunks)
    assert len(model.calls) > len(chunks) and loops == []  # verified, and refused ...
    assert all(after is before for after, before in zip(closed, chunks, strict=True))
    _, accepted = close_loops(model, index_processor, range(200), chunks, LoopClosureConfig(max_alignment_error=1.0))
    assert accepted, "without the alignment check the loop is kept"
    for loop in accepted:  # ... because of the fits alone: the places do overlap
        assert max(loop.alignment_errors) > LoopClosureConfig().max_alignment_error
        assert loop.co_visible >= LoopClosureConfig().min_co_visible


class OnePlaceDistorted(StandInModel):
    """Exact everywhere but in the world points of one place (0: the first, 1: the second) of each pair chunk of loop
    verification, which are scaled about the origin by a per-pixel factor 1 + N(0, `distortion`)."""

    def __init__(self, trajectory: LoopTrajectory, place: int, distortion: float, **options):
        super().__init__(trajectory, **options)
        self.place, self.distortion = place, distortion

    def reconstruct(self, geometry_pixel_values: torch.Tensor, **kwargs):
        output = super().reconstruct(geometry_pixel_values, **kwargs)
        jumps = (geometry_pixel_values[0, :, 0, 0, 0].diff() != 1).nonzero()
        if len(jumps):  # a pair chunk: the views of the first place, then those of the second
            split = int(jumps[0]) + 1
            views = slice(0, split) if self.place == 0 else slice(split, None)
            points = output.world_points[0, views]
            factor = 1 + self.distortion * torch.from_numpy(self.rng.normal(size=points.shape[:-1])).float()
            output.world_points[0, views] = points * factor[..., None]
        return output


@pytest.mark.parametrize("place", [0, 1], ids=["first-place", "second-place"])
def test_a_pair_chunk_is_rejected_when_either_place_alone_aligns_badly(place):
    """The check takes the worse of the two fits: a loop whose one place fits well is still refused."""
    trajectory = LoopTrajectory(200)
    model = OnePlaceDistorted(trajectory, place, distortion=0.03, **DRIFT)
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    _, loops = close_loops(model, index_processor, range(200), chunks)
    assert loops == []
    _, accepted = close_loops(model, index_processor, range(200), chunks, LoopClosureConfig(max_alignment_error=1.0))
    assert accepted, "without the alignment check the loop is kept"
    limit = LoopClosureConfig().max_alignment_error
    for loop in accepted:  # only the distorted place fits badly, and the places overlap
        assert loop.alignment_errors[place] > limit >= loop.alignment_errors[1 - place]
        assert loop.co_visible >= LoopClosureConfig().min_co_visible


def test_verifying_the_candidates_shows_a_progress_bar(capsys):
    logging.enable_progress_bar()
    trajectory = LoopTrajectory(200)
    model = StandInModel(trajectory)
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    capsys.readouterr()
    _, loops = close_loops(model, index_processor, range(200), chunks)
    verified = len(model.calls) - len(chunks)
    assert loops and verified >= len(loops)
    err = capsys.readouterr().err
    assert "Verifying loop candidates" in err and f"{verified}/{verified}" in err, err


def test_global_points_move_with_their_chunk():
    """Closing the loop moves each chunk's world points; its global points (in the global head's frame, aligned in
    their own frame) must move with them, so that every chunk's global-to-world similarity stays the first chunk's."""
    trajectory = LoopTrajectory(200)
    model = StandInModel(trajectory, global_points=True, **DRIFT)
    chunks = list(stream_reconstruction(model, index_processor, range(200), CHUNK, OVERLAP, describe_views=True))
    closed, loops = close_loops(model, index_processor, range(200), chunks)
    assert loops

    def global_frame(chunk) -> Similarity:  # global points -> world points (exact fits: no noise, no outliers)
        output = chunk.reconstruction
        return Similarity(*umeyama(output.global_points.reshape(-1, 3), output.world_points.reshape(-1, 3)))

    reference = global_frame(chunks[0])
    probe = chunks[0].reconstruction.global_points.reshape(-1, 3).double()
    tolerance = 1e-4 * float(reference.apply(probe).std())
    moved = 0.0
    for before, after in zip(chunks, closed, strict=True):
        for chunk in (before, after):  # before: what the merge gives; after: what closing the loop must keep
            error = (global_frame(chunk).apply(probe) - reference.apply(probe)).norm(dim=1).max()
            assert error < tolerance, (
                f"chunk {chunk.index}: global frame off by {error:.2e} (tolerance {tolerance:.2e})"
            )
        shift = (after.reconstruction.world_points - before.reconstruction.world_points).norm(dim=-1).max()
        moved = max(moved, float(shift))
    assert moved > 100 * tolerance  # the loop did move the chunks


@pytest.mark.parametrize(
    ("num_views", "config", "expected"),
    [
        # min_separation: 2 x chunk (32) or a tenth of the views, the larger; suppression: the chunk; window: half
        (200, LoopClosureConfig(), (2 * CHUNK, CHUNK, CHUNK // 2)),
        (400, LoopClosureConfig(), (40, CHUNK, CHUNK // 2)),
        # never closer than twice the window, so that the two places of a pair chunk do not overlap
        (200, LoopClosureConfig(window=20), (40, CHUNK, 20)),
        (200, LoopClosureConfig(min_separation=50, suppression=5, window=3), (50, 5, 3)),
    ],
)
def test_unset_loop_settings_follow_the_chunk_size_as_documented(monkeypatch, num_views, config, expected):
    import g2vlm_hf.chunked as chunked

    model = StandInModel(LoopTrajectory(num_views))
    chunks = list(stream_reconstruction(model, index_processor, range(num_views), CHUNK, OVERLAP, describe_views=True))
    searched, pair_sizes = [], []
    real_search, real_pass = chunked.find_loop_candidates, chunked.reconstruct_views
    monkeypatch.setattr(chunked, "find_loop_candidates", lambda d, *a: searched.append(a[:2]) or real_search(d, *a))
    monkeypatch.setattr(
        chunked,
        "reconstruct_views",
        lambda m, p, views, **k: pair_sizes.append(len(views)) or real_pass(m, p, views, **k),
    )
    close_loops(model, index_processor, range(num_views), chunks, config)
    min_separation, suppression, window = expected
    assert searched == [(min_separation, suppression)]
    assert pair_sizes and set(pair_sizes) == {2 * window}  # each place: `window` views
