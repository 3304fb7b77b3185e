"""Point-map metrics: accuracy, completeness and normal consistency after a similarity alignment.

Accuracy is the mean distance from each predicted point to its nearest ground-truth point, completeness the mean
distance from each ground-truth point to its nearest predicted point, and normal consistency the mean |cos| between
the normals of those nearest pairs (the DUSt3R / Spann3R / CUT3R / Pi3 multi-view reconstruction protocol; the
alignment is a similarity fit, optionally refined by rigid point-to-point ICP as the reference does).

Nearest neighbours are exact. On a GPU, and for small clouds, they are brute force (`torch.cdist` over blocks of
`chunk_size` queries by `chunk_size` points): O(M * K) time for M queries against K points, and memory bounded by one
block (`chunk_size`² distances, 32 MB at the default 2048) whatever M and K, so two 1036x280 views (580,160 points a
side) fit anywhere. On the CPU, from `KD_TREE_PAIRS` query-point pairs on, a KD-tree (scipy's `cKDTree`, when scipy
is installed) answers them in O((M + K) log K), as the reference does: minutes of brute force become seconds.
"""

from __future__ import annotations

import torch

from .alignment import ArrayLike, apply_similarity, as_float64, as_mask, umeyama

DEFAULT_CHUNK_SIZE = 2048
"""Queries and points per distance block (a block holds `chunk_size`² float64 distances: 32 MB)."""

KD_TREE_PAIRS = 2**24
"""From this many query-point pairs (M * K) on, a CPU search uses a KD-tree when scipy is installed (below it, about
4,000 points a side, brute force takes milliseconds)."""


def _check_cloud(array: torch.Tensor, name: str) -> None:
    if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (M, 3) array, got {tuple(array.shape)}.")


def k_nearest_with_distances(
    queries: ArrayLike,
    points: ArrayLike,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices `(M, k)` of the `k` nearest of `points` `(K, 3)` to each of `queries` `(M, 3)`, nearest
    first (`k` is capped at K). Exact: blocks of `chunk_size` queries by `chunk_size` points, each query's best `k`
    kept across the point blocks, so memory stays at one block whatever M and K; on the CPU from `KD_TREE_PAIRS`
    pairs on, a KD-tree (scipy) instead."""
    queries, points = as_float64(queries, "query points"), as_float64(points, "reference points")
    _check_cloud(queries, "query points")
    _check_cloud(points, "reference points")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    k = min(k, points.shape[0])
    tree = _kd_tree_class() if torch.device(device).type == "cpu" else None
    if tree is not None and queries.shape[0] * points.shape[0] >= KD_TREE_PAIRS:
        distances, indices = tree(points.numpy()).query(queries.numpy(), k=k, workers=-1)
        shape = (queries.shape[0], k)  # scipy drops the k axis when k is 1
        return torch.from_numpy(distances).reshape(shape), torch.from_numpy(indices).long().reshape(shape)
    distances, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        block = queries[start : start + chunk_size].to(device)
        best = torch.empty((block.shape[0], 0), dtype=torch.float64, device=device)
        best_index = torch.empty((block.shape[0], 0), dtype=torch.long, device=device)
        for first in range(0, points.shape[0], chunk_size):
            part = torch.cdist(block, points[first : first + chunk_size].to(device))
            near = part.topk(min(k, part.shape[1]), dim=1, largest=False, sorted=False)
            candidates = torch.cat([best, near.values], dim=1)
            candidate_index = torch.cat([best_index, near.indices + first], dim=1)
            keep = candidates.topk(min(k, candidates.shape[1]), dim=1, largest=False, sorted=True).indices
            best, best_index = candidates.gather(1, keep), candidate_index.gather(1, keep)
        distances.append(best.cpu())
        indices.append(best_index.cpu())
    return torch.cat(distances), torch.cat(indices)


def _kd_tree_class():
    """scipy's `cKDTree`, or None without scipy (brute force then)."""
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        return None
    return cKDTree


def nearest_neighbours(
    queries: ArrayLike, points: ArrayLike, chunk_size: int = DEFAULT_CHUNK_SIZE, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to, and index of, the nearest of `points` `(K, 3)` for each of `queries` `(M, 3)`."""
    distances, indices = k_nearest_with_distances(queries, points, 1, chunk_size, device)
    return distances[:, 0], indices[:, 0]


def knn_normals(
    points: ArrayLike, k: int = 30, chunk_size: int = DEFAULT_CHUNK_SIZE, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Unit normals `(M, 3)` of a cloud by principal component analysis of each point's `k` nearest neighbours.

    The normal is the eigenvector of the smallest eigenvalue of the neighbourhood covariance, as Open3D's
    `estimate_normals()` computes with its default 30-neighbour search (the sign is arbitrary; consistency uses |cos|).
    """
    points = as_float64(points, "points")
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 3:
        raise ValueError(f"knn_normals needs an (M, 3) cloud of at least 3 points, got {tuple(points.shape)}.")
    _, nearest = k_nearest_with_distances(points, points, k, chunk_size, device)  # one search: (M, k) indices
    normals = []
    for start in range(0, points.shape[0], chunk_size):  # neighbourhoods of one block of points at a time
        neighbourhoods = points[nearest[start : start + chunk_size]]
        centred = neighbourhoods - neighbourhoods.mean(1, keepdim=True)
        covariance = centred.transpose(1, 2) @ centred / neighbourhoods.shape[1]
        normals.append(torch.linalg.eigh(covariance).eigenvectors[..., 0])
    return torch.cat(normals)


def icp_refine(
    source: torch.Tensor,
    target: torch.Tensor,
    max_distance: float,
    iterations: int = 30,
    tolerance: float = 1e-6,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Rigid point-to-point ICP of `source` `(M, 3)` onto `target` `(K, 3)`; returns the moved source.

    Each step pairs every source point with its nearest target point, keeps pairs closer than `max_distance`, and
    applies the best rigid motion of those pairs; it stops after `iterations` steps or when the inlier fraction and
    the inlier RMSE both change by less than `tolerance`, as Open3D's `registration_icp` with its defaults.
    """
    moved = source.clone()
    previous = None
    for _ in range(iterations):
        distance, index = nearest_neighbours(moved, target, chunk_size, device)
        inliers = distance < max_distance
        if int(inliers.sum()) < 3:
            break
        fitness, rmse = float(inliers.double().mean()), float(distance[inliers].pow(2).mean().sqrt())
        if previous is not None and abs(fitness - previous[0]) < tolerance and abs(rmse - previous[1]) < tolerance:
            break
        previous = (fitness, rmse)
        _, rotation, translation = umeyama(moved[inliers], target[index[inliers]], with_scale=False)
        moved = apply_similarity(moved, 1.0, rotation, translation)
    return moved


def grid_normals(points: ArrayLike, valid: ArrayLike | None = None) -> torch.Tensor:
    """Unit normals of point maps `(..., H, W, 3)` from the cross product of central differences on the pixel grid.

    Only valid pixels (`valid` `(..., H, W)`, and always finite ones) take part: a difference with an invalid or
    missing neighbour is one-sided (as at the border), and a pixel with no valid neighbour along rows or columns, or
    an invalid pixel, gets the zero normal, as does one where the cross product vanishes (its consistency scores 0).
    """
    points = as_float64(points, "point map")
    if points.ndim < 3 or points.shape[-1] != 3:
        raise ValueError(f"Point maps must be (..., H, W, 3), got {tuple(points.shape)}.")
    usable = torch.isfinite(points).all(-1)
    if valid is not None:
        usable &= as_mask(valid, usable.shape)
    d_rows, d_columns = _valid_difference(points, usable, -3), _valid_difference(points, usable, -2)
    normals = torch.linalg.cross(d_columns, d_rows, dim=-1)
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)


def _valid_difference(points: torch.Tensor, usable: torch.Tensor, dim: int) -> torch.Tensor:
    """The derivative of `points` along grid axis `dim` (-3 rows, -2 columns) from usable pixels: the mean of the
    differences to the usable neighbours before and after (the central difference, or one-sided), zero without one."""
    size, mask_dim = points.shape[dim], dim + 1
    if size < 2:
        return torch.zeros_like(points)
    step = points.narrow(dim, 1, size - 1) - points.narrow(dim, 0, size - 1)  # from pixel i to pixel i + 1
    both = usable.narrow(mask_dim, 1, size - 1) & usable.narrow(mask_dim, 0, size - 1)
    step = torch.where(both[..., None], step, 0.0)
    no_step, no_pair = torch.zeros_like(step.narrow(dim, 0, 1)), torch.zeros_like(both.narrow(mask_dim, 0, 1))
    ahead, behind = torch.cat([step, no_step], dim), torch.cat([no_step, step], dim)
    count = torch.cat([both, no_pair], mask_dim).double() + torch.cat([no_pair, both], mask_dim).double()
    return (ahead + behind) / count.clamp(min=1.0)[..., None]


def median(values: torch.Tensor) -> float:
    """Median of a 1-D tensor as numpy computes it (the mean of the two middle values for an even count), which the
    reference reports; `torch.median` returns the lower of the two."""
    ordered = values.sort().values
    middle = (ordered.numel() - 1) // 2
    return float((ordered[middle] + ordered[ordered.numel() // 2]) / 2)


def point_cloud_metrics(
    pred: ArrayLike,
    gt: ArrayLike,
    pred_normals: ArrayLike | None = None,
    gt_normals: ArrayLike | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Accuracy, completeness and, with normals, normal consistency (means and medians) of two clouds `(M, 3)`."""
    pred, gt = as_float64(pred, "predicted points"), as_float64(gt, "ground-truth points")
    accuracy, to_gt = nearest_neighbours(pred, gt, chunk_size, device)
    completeness, to_pred = nearest_neighbours(gt, pred, chunk_size, device)
    metrics = {
        "accuracy": float(accuracy.mean()),
        "accuracy_median": median(accuracy),
        "completeness": float(completeness.mean()),
        "completeness_median": median(completeness),
    }
    if pred_normals is not None and gt_normals is not None:
        pred_normals = as_float64(pred_normals, "predicted normals")
        gt_normals = as_float64(gt_normals, "ground-truth normals")
        if pred_normals.shape != pred.shape or gt_normals.shape != gt.shape:
            raise ValueError("Normals must have the shapes of their point clouds.")
        nc_accuracy = (gt_normals[to_gt] * pred_normals).sum(-1).abs()
        nc_completeness = (gt_normals * pred_normals[to_pred]).sum(-1).abs()
        metrics["nc_accuracy"] = float(nc_accuracy.mean())
        metrics["nc_accuracy_median"] = median(nc_accuracy)
        metrics["nc_completeness"] = float(nc_completeness.mean())
        metrics["nc_completeness_median"] = median(nc_completeness)
        metrics["normal_consistency"] = (metrics["nc_accuracy"] + metrics["nc_completeness"]) / 2
    return metrics


def evaluate_point_maps(
    pred: ArrayLike,
    gt: ArrayLike,
    valid: ArrayLike | None = None,
    align: bool = True,
    icp_distance: float | None = None,
    normals: str = "knn",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Point-map metrics of one scene.

    Args:
        pred: `(N, H, W, 3)` predicted world points (any frame and scale when `align`).
        gt: `(N, H, W, 3)` ground-truth world points.
        valid: optional `(N, H, W)` mask of pixels with ground truth; non-finite points are always dropped.
        align: fit a similarity (Umeyama) from the valid predicted points to the ground truth first.
        icp_distance: then refine with rigid point-to-point ICP, pairs closer than this (the reference protocol:
            0.1 for ETH3D / 7-Scenes / NRGBD, 100 for DTU in millimetres); None skips it.
        normals: "knn" (PCA of 30 nearest neighbours in the cloud, as the reference) or "grid" (from the pixel grid,
            `grid_normals`; cheaper, and defined on creases).
    Returns:
        `accuracy`, `completeness`, `nc_accuracy`, `nc_completeness` and their `*_median`s, `normal_consistency`,
        `valid_points`, and the alignment `scale`.
    """
    pred, gt = as_float64(pred, "predicted points"), as_float64(gt, "ground-truth points")
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(
            f"Point maps must both be (N, H, W, 3) of one size, got {tuple(pred.shape)} and {tuple(gt.shape)}; "
            "resize the prediction to the ground-truth size first."
        )
    mask = torch.isfinite(pred).all(-1) & torch.isfinite(gt).all(-1)
    if valid is not None:
        mask &= as_mask(valid, mask.shape)
    if int(mask.sum()) < 3:
        raise ValueError("Fewer than 3 valid points in this scene: check its valid mask.")
    if normals not in ("knn", "grid"):
        raise ValueError(f"Unknown normals {normals!r}; use 'knn' or 'grid'.")
    scale = 1.0
    if align:
        scale, rotation, translation = umeyama(pred[mask], gt[mask])
        pred = apply_similarity(pred, scale, rotation, translation)
    if normals == "grid":
        pred_normals, gt_normals = grid_normals(pred, mask)[mask], grid_normals(gt, mask)[mask]
    pred, gt = pred[mask], gt[mask]
    if icp_distance is not None:
        pred = icp_refine(pred, gt, icp_distance, chunk_size=chunk_size, device=device)
    if normals == "knn":
        pred_normals, gt_normals = knn_normals(pred, 30, chunk_size, device), knn_normals(gt, 30, chunk_size, device)
    metrics = point_cloud_metrics(pred, gt, pred_normals, gt_normals, chunk_size, device)
    metrics["valid_points"] = int(mask.sum())
    metrics["scale"] = scale
    return metrics
