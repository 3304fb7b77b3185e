"""Peak memory and time of one demo reconstruction against the number of views (640x480 textured photos), the
figures behind the page's estimate (`RunEstimate` in app.py). Each count runs in a fresh process (a process's peak
resident memory only grows).

    python demo/benchmark_memory.py MODEL_FOLDER [--views 2 4 8 12 16] [--target-width 518]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def textured(index: int, width: int = 640, height: int = 480) -> Image.Image:
    """A photo-like view: gradients, noise and shapes, different per index."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 160], axis=-1)
    base += rng.normal(0, 25, (height, width, 3))
    for _ in range(12):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 80)
        base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def one_run(model: str, views: int, target_width: int) -> dict:
    import torch

    from g2vlm_hf.model_loading import load_checked

    model_, processor = load_checked(model, "auto", "cpu")
    processor.geometry_image_processor.target_width = target_width
    images = [textured(index) for index in range(views)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    inputs = processor(geometry_images=images, return_tensors="pt")
    with torch.inference_mode():
        output = model_.reconstruct(**inputs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels = int(np.prod(output.world_points.shape[1:4]))
    return {"views": views, "pixels": pixels, "extra_gb": (peak - before) / 1e6, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    parser.add_argument("--target-width", type=int, default=518)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.model, args.one, args.target_width)))
        return
    rows = []
    for views in args.views:
        command = [sys.executable, __file__, args.model, "--one", str(views), "--target-width", str(args.target_width)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
        print(
            f"{rows[-1]['views']:>5} views  {rows[-1]['pixels']:>10,} points  "
            f"+{rows[-1]['extra_gb']:.2f} GB  {rows[-1]['seconds']:.1f} s",
            flush=True,
        )
    n = np.array([row["views"] for row in rows], dtype=float)
    for key in ("extra_gb", "seconds"):
        coefficients = np.linalg.lstsq(np.stack([n, n * n], axis=1), [row[key] for row in rows], rcond=None)[0]
        print(f"{key} ~ {coefficients[0]:.4g} * views + {coefficients[1]:.4g} * views^2")


if __name__ == "__main__":
    main()
