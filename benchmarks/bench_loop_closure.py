"""Loop closure of chunked reconstruction on trajectories that revisit their start: ATE (relative to the trajectory's
extent) without and with loop closure, and for the noise alone, at 200 / 500 / 2,000 views.

The model is the tests' stand-in (`tests/synthetic_trajectories.py`): the truth of a circular walk in a fresh random
similarity frame per chunk, with per-view noise, gross outliers, and drift (each step between consecutive views of a
chunk biased by a rotation and a scale error, as visual odometry drifts; the same drift over the loop at every length),
so the chain of chunk alignments drifts while each chunk is nearly right. Geometry only: the figures measure alignment and loop closure, not a network.

    python benchmarks/bench_loop_closure.py                    # the README table (a minute or two)
    python benchmarks/bench_loop_closure.py --views 200 --seeds 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_trajectories import LoopTrajectory, StandInModel, index_processor, relative_ate
from transformers.utils import logging

from g2vlm_hf.chunked import LoopClosureConfig, close_loops, merge_chunks, stream_reconstruction


def run(num_views: int, seed: int, args: argparse.Namespace) -> dict:
    trajectory = LoopTrajectory(num_views, seed=seed)
    options = dict(noise=args.noise, outlier_share=args.outliers, seed=seed + 1)
    drift = dict(drift_rotation=args.drift_rotation / num_views, drift_scale=args.drift_scale / num_views)
    views = range(num_views)

    model = StandInModel(trajectory, **options, **drift)
    chunks = list(
        stream_reconstruction(model, index_processor, views, args.chunk_size, args.overlap, describe_views=True)
    )
    start = time.perf_counter()
    closed, loops = close_loops(model, index_processor, views, chunks, LoopClosureConfig())
    seconds = time.perf_counter() - start

    noise_model = StandInModel(trajectory, **options)
    noise_only = merge_chunks(stream_reconstruction(noise_model, index_processor, views, args.chunk_size, args.overlap))
    return {
        "without": relative_ate(merge_chunks(chunks).camera_poses[0], trajectory),
        "with": relative_ate(merge_chunks(closed).camera_poses[0], trajectory),
        "noise_only": relative_ate(noise_only.camera_poses[0], trajectory),
        "loops": len(loops),
        "pair_chunks": len(model.calls) - len(chunks),
        "chunks": len(chunks),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", default=[200, 500, 2000])
    parser.add_argument("--seeds", type=int, default=3, help="trajectories per row (different start points and noise)")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.002, help="per-view noise (share of the extent, rad, depth)")
    parser.add_argument("--outliers", type=float, default=0.1, help="share of gross outliers among the points")
    parser.add_argument("--drift-rotation", type=float, default=0.6, help="rad over the loop (spread over its steps)")
    parser.add_argument("--drift-scale", type=float, default=0.4, help="scale error (log) over the loop")
    args = parser.parse_args(argv)
    logging.disable_progress_bar()

    print(f"chunks of {args.chunk_size} sharing {args.overlap}; noise {args.noise}, outliers {args.outliers:.0%}, drift "
          f"{args.drift_rotation} rad and {args.drift_scale} log-scale over the loop; mean of {args.seeds} seeds")  # fmt: skip
    print("\n| views | chunks | ATE, no loop closure | ATE, loop closure | ATE, noise alone (no drift) | loops kept / "
          "pair chunks | loop-closure time |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for num_views in args.views:
        runs = [run(num_views, seed, args) for seed in range(args.seeds)]
        row = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
        rows.append({"views": num_views, **row})
        print(f"| {num_views} | {row['chunks']:.0f} | {row['without']:.2e} | {row['with']:.2e} | {row['noise_only']:.2e} "
              f"| {row['loops']:.1f} / {row['pair_chunks']:.1f} | {row['seconds']:.2f} s |", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
