"""`g2vlm reconstruct --chunk-size` through the command line at 64 / 256 / 1,024 views of 112x112: wall time, peak
RSS of the command's process, and the size of what it wrote. The tiny official checkpoint (converted from
`../shared/fixtures/official-tiny`) reconstructs synthetic textured views (a camera sliding over a random texture),
its processor set to 112-pixel geometry views. Each run is a child of its own measuring process, so its peak RSS
(`resource.getrusage(RUSAGE_CHILDREN)`) is its own.

    python benchmarks/bench_cli_streaming.py                         # 64, 256, 1,024 views
    python benchmarks/bench_cli_streaming.py --views 64 256          # a quicker look
    python benchmarks/bench_cli_streaming.py --video --views 64 1000 # the views as frames of one video (--video)

With streaming exports, RSS should be flat in N (one chunk plus the point budget, --max-points, which the 64-view run
already fills) and time linear.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-tiny" / "checkpoint"
SIDE = 112
CLI = "import sys; from g2vlm_hf.cli import main; sys.exit(main())"


def synthetic_views(count: int, seed: int = 0):
    """`count` 112x112 crops of a smooth random texture, 3 pixels apart along it."""
    generator = np.random.default_rng(seed)
    coarse = generator.integers(0, 256, size=(SIDE // 8 + 1, (SIDE + 3 * count) // 8 + 2, 3), dtype=np.uint8)
    texture = Image.fromarray(coarse).resize((coarse.shape[1] * 8, coarse.shape[0] * 8), Image.BICUBIC)
    for index in range(count):
        yield texture.crop((3 * index, 0, 3 * index + SIDE, SIDE))


def write_views(path: Path, count: int, video: bool) -> None:
    """The synthetic views as PNG files in the folder `path`, or as the frames of an MPEG-4 video at `path`."""
    if not video:
        path.mkdir(parents=True)
        for index, view in enumerate(synthetic_views(count)):
            view.save(path / f"{index:05d}.png")
        return
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuv420p"
        for view in synthetic_views(count):
            container.mux(stream.encode(av.VideoFrame.from_image(view)))
        container.mux(stream.encode())


def prepare_model(folder: Path) -> Path:
    """The converted tiny checkpoint with 112-pixel geometry views."""
    from g2vlm_hf.conversion import convert_official_checkpoint

    model = convert_official_checkpoint(FIXTURE, folder / "g2vlm-tiny")
    config = json.loads((model / "processor_config.json").read_text())
    config["image_processor"]["target_width"] = SIDE
    (model / "processor_config.json").write_text(json.dumps(config))
    return model


def measure(args: argparse.Namespace) -> None:
    """One run of the command line as this process's child; prints a JSON line of its figures."""
    output = Path(args.work) / f"scene{args.count}"
    source = ["--video", args.source, "--every", "1"] if args.video else ["--folder", args.source]
    command = [sys.executable, "-c", CLI, "reconstruct", "--model", args.model, *source,
               "--chunk-size", str(args.chunk_size), "--overlap", str(args.overlap), "--max-points",
               str(args.max_points), "--output", str(output), "--device", "cpu"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    files = [path for path in output.rglob("*") if path.is_file()]
    figures = {
        "views": args.count,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "output_mb": sum(path.stat().st_size for path in files) / 2**20,
        "files": len(files),
        "ply_mb": (output / "points.ply").stat().st_size / 2**20,
    }
    shutil.rmtree(output)
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--max-points", type=int, default=200_000, help="the point budget (64 views hold 800k)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--video", action="store_true", help="read the views from one MPEG-4 video (--video)")
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model = prepare_model(Path(work))
        for count in args.views:
            source = Path(work) / (f"views{count}.mp4" if args.video else f"views{count}")
            write_views(source, count, args.video)
            result = subprocess.run(
                [sys.executable, __file__, "--measure", "--count", str(count), "--model", str(model), "--source",
                 str(source), "--work", work, "--chunk-size", str(args.chunk_size), "--overlap", str(args.overlap),
                 "--max-points", str(args.max_points), *(["--video"] if args.video else [])],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            if source.is_dir():
                shutil.rmtree(source)
            else:
                source.unlink()
            print(f"measured {count} views", file=sys.stderr)
    first = rows[0]
    kind = "frames of one video" if args.video else "views in a folder"
    print(f"chunk {args.chunk_size}, overlap {args.overlap}, --max-points {args.max_points:,}, {SIDE}x{SIDE} {kind}")
    print("| views | wall s | s / view | peak RSS MB | RSS / first | output MB | points.ply MB | files |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['views']:,} | {row['seconds']:.1f} | {row['seconds'] / row['views']:.3f} | "
            f"{row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / first['peak_rss_mb']:.2f} | {row['output_mb']:.1f} | "
            f"{row['ply_mb']:.1f} | {row['files']:,} |"
        )


if __name__ == "__main__":
    main()
