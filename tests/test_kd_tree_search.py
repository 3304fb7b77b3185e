"""The nearest-neighbour search of the point metrics on the CPU: a KD-tree (scipy) for large clouds gives the exact
neighbours brute force gives, and full-resolution point maps are evaluated in seconds on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g2vlm_hf.evaluation import points as points_module
from g2vlm_hf.evaluation.points import evaluate_point_maps, k_nearest_with_distances

pytest.importorskip("scipy", reason="scipy is part of the test extras")


def _no_brute_force(*args, **kwargs):
    raise AssertionError("the brute-force search ran")


@pytest.mark.parametrize("k", [1, 7])
def test_the_kd_tree_finds_the_neighbours_brute_force_finds(monkeypatch, k):
    """With the search forced onto the KD-tree (no `torch.cdist` call allowed), the k nearest are those of the full
    distance matrix computed here with NumPy, nearest first, as int64 indices (also for k = 1, which scipy squeezes)."""
    generator = torch.Generator().manual_seed(k)
    queries, cloud = torch.randn(500, 3, generator=generator), torch.randn(800, 3, generator=generator) * 3
    pairs = np.linalg.norm(queries.double().numpy()[:, None] - cloud.double().numpy()[None], axis=-1)  # (500, 800)
    brute_indices = np.argsort(pairs, axis=1)[:, :k]
    brute_distances = np.take_along_axis(pairs, brute_indices, axis=1)
    monkeypatch.setattr(points_module, "KD_TREE_PAIRS", 1)
    monkeypatch.setattr(torch, "cdist", _no_brute_force)
    distances, indices = k_nearest_with_distances(queries, cloud, k)
    assert distances.shape == indices.shape == (500, k) and indices.dtype == torch.long
    np.testing.assert_allclose(distances.numpy(), brute_distances, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(indices.numpy(), brute_indices)  # random points: no ties


def test_small_clouds_and_a_missing_scipy_keep_brute_force(monkeypatch):
    """Below `KD_TREE_PAIRS` (and without scipy, always) the blocked brute force runs: what a GPU runs too."""
    calls = []
    real_cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda *a, **k: calls.append(1) or real_cdist(*a, **k))
    cloud = torch.randn(300, 3, dtype=torch.float64)
    k_nearest_with_distances(cloud, cloud, 3, chunk_size=100)
    assert len(calls) == 9  # 3 x 3 blocks
    monkeypatch.setattr(points_module, "KD_TREE_PAIRS", 1)
    monkeypatch.setattr(points_module, "_kd_tree_class", lambda: None)
    k_nearest_with_distances(cloud, cloud, 3, chunk_size=100)
    assert len(calls) == 18


def test_a_full_resolution_point_map_is_evaluated_on_the_cpu(monkeypatch):
    """One 518x392 view (203,056 points a side; 4e10 pairs per brute-force search, minutes on 2 cores): no search
    falls back to brute force (`torch.cdist` may not run), and a prediction that is a similarity of the ground truth
    scores accuracy and completeness 0 and normal consistency 1, through the alignment, ICP and the 30-neighbour
    normals."""
    monkeypatch.setattr(torch, "cdist", _no_brute_force)
    rows, columns = np.meshgrid(np.linspace(-1, 1, 392), np.linspace(-1.3, 1.3, 518), indexing="ij")
    surface = 0.2 * np.sin(3 * columns) * np.cos(2 * rows)  # a smooth bumpy wall at depth 4
    gt = torch.from_numpy(np.stack([columns, rows, 4 + surface], -1)[None])
    angle = 0.3
    rotation = torch.tensor(
        [[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]], dtype=torch.float64
    )
    pred = 0.5 * gt @ rotation.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    metrics = evaluate_point_maps(pred, gt, icp_distance=0.1)
    assert metrics["valid_points"] == 392 * 518
    assert metrics["scale"] == pytest.approx(2.0, rel=1e-9)
    assert metrics["accuracy"] < 1e-9 and metrics["completeness"] < 1e-9
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=1e-9)
