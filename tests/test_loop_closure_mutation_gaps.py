"""Parts of loop closure (`g2vlm_hf.loop_closure`) that mutation testing found unchecked: the edges of the candidate
search (a separation of one view, a score exactly at the threshold, a candidate exactly one suppression block away,
a non-finite view with a threshold of -1), and the co-visible share on its smallest input and its sample size. Every
expected value is derived by hand on a tiny input."""

from __future__ import annotations

import pytest
import torch

from g2vlm_hf.loop_closure import (
    LoopClosureConfig,
    PoseGraphEdge,
    co_visible_share,
    find_loop_candidates,
    optimise_pose_graph,
)
from g2vlm_hf.similarity import Similarity


def one_hot(count: int, dim: int = 64) -> torch.Tensor:
    """`count` orthonormal descriptors: every pair has cosine similarity exactly 0."""
    return torch.eye(dim)[:count].clone()


def pairs(candidates) -> list[tuple[int, int]]:
    return [(candidate.first, candidate.second) for candidate in candidates]


def test_a_separation_of_one_view_pairs_neighbours():
    """`min_separation` 1 is valid (at least 1): the next view is then a possible partner."""
    descriptors = one_hot(4)
    descriptors[1] = descriptors[0]  # views 0 and 1 identical, 2 and 3 unlike anything
    candidates = find_loop_candidates(descriptors, min_separation=1, suppression=1, threshold=0.5, max_loops=5)
    assert pairs(candidates) == [(0, 1)] and candidates[0].score == 1.0
    assert find_loop_candidates(descriptors, min_separation=2, suppression=1, threshold=0.5, max_loops=5) == []


def test_a_score_exactly_at_the_threshold_is_a_candidate():
    """Candidates have a similarity of *at least* the threshold: 0.5 (two unit vectors 60 degrees apart) with
    threshold 0.5 is one, with threshold 0.6 is not."""
    descriptors = torch.zeros(3, 2)
    descriptors[0] = torch.tensor([1.0, 0.0])
    descriptors[1] = torch.tensor([-1.0, 0.0])  # unlike view 0 (-1)
    descriptors[2] = torch.tensor([0.5, 3**0.5 / 2])  # cos = 0.5 exactly with view 0 (1 * 0.5 + 0 * ...)
    candidates = find_loop_candidates(descriptors, min_separation=2, suppression=1, threshold=0.5, max_loops=5)
    assert pairs(candidates) == [(0, 2)] and candidates[0].score == 0.5
    assert find_loop_candidates(descriptors, min_separation=2, suppression=1, threshold=0.6, max_loops=5) == []
    identical = torch.stack([descriptors[0], descriptors[1], descriptors[0]])
    assert pairs(find_loop_candidates(identical, 2, 1, 1.0, 5)) == [(0, 2)]  # similarity 1 reaches threshold 1


def test_a_candidate_one_suppression_block_away_is_kept():
    """One candidate per `suppression` x `suppression` block: a second candidate whose first view is exactly
    `suppression` views away from a kept one is in another block (kept), one view closer is in the same (dropped)."""
    descriptors = one_hot(60)
    descriptors[50] = descriptors[0]  # loop (0, 50)
    descriptors[51] = descriptors[4]  # loop (4, 51): first views 4 apart, second views 1 apart
    candidates = find_loop_candidates(descriptors, min_separation=10, suppression=4, threshold=0.9, max_loops=5)
    assert pairs(candidates) == [(0, 50), (4, 51)]
    descriptors[51] = descriptors[3]  # loop (3, 51): both views within 4 of (0, 50): the same block
    candidates = find_loop_candidates(descriptors, min_separation=10, suppression=4, threshold=0.9, max_loops=5)
    assert pairs(candidates) == [(0, 50)]


def test_a_non_finite_view_has_no_partner_even_at_the_lowest_threshold():
    """With threshold -1 (every finite pair qualifies) a NaN descriptor still pairs with nothing: view 0's only
    finite partner is view 1 (similarity -1), not the NaN view 2."""
    descriptors = torch.zeros(3, 2)
    descriptors[0] = torch.tensor([1.0, 0.0])
    descriptors[1] = torch.tensor([-1.0, 0.0])
    descriptors[2] = float("nan")
    candidates = find_loop_candidates(descriptors, min_separation=1, suppression=1, threshold=-1.0, max_loops=5)
    assert pairs(candidates) == [(0, 1)] and candidates[0].score == -1.0


def test_the_co_visible_share_of_two_points():
    """Two points of the first place (1 apart: the spacing is 1) are enough to measure a spacing: a point 0.5 from
    them lies on them, a point 10 away does not."""
    first = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert co_visible_share(first, torch.tensor([[0.5, 0.0, 0.0]])) == 1.0
    assert co_visible_share(first, torch.tensor([[0.5, 0.0, 0.0], [10.0, 0.0, 0.0]])) == 0.5
    assert co_visible_share(first, torch.tensor([[0.0, 2.9, 0.0], [0.0, 3.1, 0.0]])) == 0.5  # 3 spacings: the limit
    assert co_visible_share(first, torch.tensor([[0.0, 3.0, 0.0]])) == 1.0  # exactly 3 spacings: within
    assert co_visible_share(first[:1], torch.tensor([[0.5, 0.0, 0.0]])) == 0.0  # one point: no spacing
    partly = torch.tensor([[0.5, 0.0, 0.0], [0.5, float("nan"), 0.0], [float("inf"), 0.0, 0.0]])
    assert co_visible_share(first, partly) == 1.0  # a point with any non-finite coordinate is ignored


def test_the_co_visible_distance_scales_with_the_spacing():
    """The limit is 3 times the first place's spacing, whatever its unit: with points 2 apart, 5 away is within
    (5 <= 6), 7 away is not; with points 0.1 apart, 0.25 is within, 0.35 is not."""
    for spacing, within, beyond in ((2.0, 5.0, 7.0), (0.1, 0.25, 0.35)):
        first = torch.tensor([[0.0, 0.0, 0.0], [spacing, 0.0, 0.0], [2 * spacing, 0.0, 0.0]], dtype=torch.float64)
        second = torch.tensor([[0.0, within, 0.0], [0.0, beyond, 0.0]], dtype=torch.float64)
        assert co_visible_share(first, second) == 0.5
        assert co_visible_share(first, second[:1]) == 1.0


def test_the_co_visible_share_samples_at_most_2000_points_by_default():
    """By default at most 2,000 points of the second place are counted: the share is a multiple of 1/2000 even for
    2,001 points (all of them counted would give 1000/2001)."""
    first = torch.stack([torch.arange(10.0), torch.zeros(10), torch.zeros(10)], dim=1)  # spacing 1
    near = first[torch.arange(1000) % 10] + torch.tensor([0.0, 0.5, 0.0])  # 0.5 from the line: co-visible
    far = torch.full((1001, 3), 100.0)
    share = co_visible_share(first, torch.cat([near, far]))
    assert share * 2000 == pytest.approx(round(share * 2000), abs=1e-6), share
    assert 0.4 < share < 0.6
    assert co_visible_share(first, torch.cat([near, far]), sample=5000) == pytest.approx(1000 / 2001, abs=1e-12)


def test_the_co_visible_share_without_finite_points_of_the_first_place_is_zero():
    """No finite point of the first place (all NaN or infinite): nothing of the second place can lie on it."""
    nowhere = torch.full((4, 3), float("nan"))
    nowhere[2:] = float("inf")
    assert co_visible_share(nowhere, torch.tensor([[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]])) == 0.0


def test_the_sampled_co_visible_share_is_reproducible():
    """The points sampled (at most `sample` of each) are drawn from `seed`: the same call gives the same share, while
    other seeds draw other samples (and shares around the true one half)."""
    first = torch.stack([torch.arange(10.0), torch.zeros(10), torch.zeros(10)], dim=1)
    near = first[torch.arange(2000) % 10] + torch.tensor([0.0, 0.5, 0.0])
    second = torch.cat([near, torch.full((2000, 3), 100.0)])[torch.randperm(4000, generator=torch.Generator())]
    shares = [co_visible_share(first, second, sample=500) for _ in range(5)]
    assert len(set(shares)) == 1, shares
    seeded = {co_visible_share(first, second, sample=500, seed=seed) for seed in range(8)}
    assert len(seeded) > 1 and all(0.35 < share < 0.65 for share in seeded), seeded


def test_the_default_settings_are_the_documented_ones():
    """README (loop closure): similarity at least 0.8, at most 32 loops, relative alignment error at most 0.05, at
    least 30% of the second place co-visible; the views-based settings follow the chunk size (None)."""
    config = LoopClosureConfig()
    assert config.similarity_threshold == 0.8
    assert config.max_loops == 32
    assert config.max_alignment_error == 0.05
    assert config.min_co_visible == 0.3
    assert (config.min_separation, config.suppression, config.window) == (None, None, None)


def test_an_edge_weighs_one_unless_told_otherwise():
    """Two edges between the same two chunks that disagree only in scale (2 and 8), one of default weight and one of
    weight 1: equal weights put the log scale half-way, scale 4; weight 3 on the second edge (a residual 3 times, a
    square 9 times larger) puts it at log2 scale (1 + 9 * 3) / 10 = 2.8."""
    identity = torch.eye(3, dtype=torch.float64)
    origin = torch.zeros(3, dtype=torch.float64)
    two, eight = Similarity(2.0, identity, origin), Similarity(8.0, identity, origin)
    start = [Similarity.identity(), Similarity.identity()]
    anchors = [Similarity.identity(), Similarity.identity()]
    _, solved = optimise_pose_graph(start, [PoseGraphEdge(0, 1, two), PoseGraphEdge(0, 1, eight, weight=1.0)], anchors)
    assert solved.scale == pytest.approx(4.0, rel=1e-6)
    torch.testing.assert_close(solved.rotation, identity, atol=1e-9, rtol=0)
    torch.testing.assert_close(solved.translation, origin, atol=1e-9, rtol=0)
    _, weighted = optimise_pose_graph(start, [PoseGraphEdge(0, 1, two), PoseGraphEdge(0, 1, eight, 3.0)], anchors)
    assert weighted.scale == pytest.approx(2**2.8, rel=1e-6)
