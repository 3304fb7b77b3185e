"""Time `evaluate_point_maps` (similarity alignment, ICP, 30-neighbour normals, accuracy / completeness) on the CPU
with the KD-tree search (scipy) against the blocked brute force, on one view of a smooth bumpy wall at several sizes.

    python benchmarks/bench_point_metrics.py [--sizes 98x130 196x259 392x518] [--brute-up-to 60000] [--threads 2]

Brute force is timed only up to `--brute-up-to` points (it grows with the square of the points: minutes beyond).
`max diff` is the largest relative difference of a metric between the two searches (torch.cdist's matrix-product
distances round differently from the KD-tree's direct ones).
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import numpy as np
import torch

from g2vlm_hf.evaluation import points as points_module
from g2vlm_hf.evaluation.points import evaluate_point_maps


def wall(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ground-truth point map `(1, H, W, 3)` and a prediction that is a similarity of it plus 1 mm of noise."""
    rows, columns = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1.3, 1.3, width), indexing="ij")
    gt = np.stack([columns, rows, 4 + 0.2 * np.sin(3 * columns) * np.cos(2 * rows)], -1)[None]
    noise = np.random.default_rng(0).normal(0, 1e-3, gt.shape)
    pred = 0.5 * (gt + noise) + np.array([1.0, -2.0, 0.5])
    return torch.from_numpy(pred), torch.from_numpy(gt)


def timed(pred: torch.Tensor, gt: torch.Tensor, kd_tree: bool) -> tuple[float, dict]:
    threshold = points_module.KD_TREE_PAIRS if kd_tree else float("inf")
    with mock.patch.object(points_module, "KD_TREE_PAIRS", threshold):
        start = time.perf_counter()
        metrics = evaluate_point_maps(pred, gt, icp_distance=0.1)
    return time.perf_counter() - start, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["98x130", "196x259", "392x518"])
    parser.add_argument("--brute-up-to", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'view':>9} {'points':>8} {'KD-tree s':>10} {'brute s':>9} {'ratio':>6} {'accuracy':>10} {'max diff':>9}")
    for size in args.sizes:
        height, width = map(int, size.split("x"))
        pred, gt = wall(height, width)
        kd_seconds, kd_metrics = timed(pred, gt, kd_tree=True)
        brute = "-", "-", "-"
        if height * width <= args.brute_up_to:
            brute_seconds, brute_metrics = timed(pred, gt, kd_tree=False)
            difference = max(
                abs(kd_metrics[key] - value) / max(abs(value), 1e-12) for key, value in brute_metrics.items()
            )
            brute = f"{brute_seconds:.2f}", f"{brute_seconds / kd_seconds:.0f}x", f"{difference:.1e}"
        print(f"{size:>9} {height * width:>8} {kd_seconds:>10.2f} {brute[0]:>9} {brute[1]:>6} "
              f"{kd_metrics['accuracy']:>10.3e} {brute[2]:>9}")  # fmt: skip


if __name__ == "__main__":
    main()
