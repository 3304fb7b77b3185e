"""One pass versus chunked reconstruction on the CPU, with the tiny random config: wall time and peak RSS for
N = 8 ... 512 views, each configuration measured in its own subprocess (so that peaks do not mix), under a memory
limit and a time limit that show where one pass stops fitting or becomes too slow. Modes: `one_pass` (`model.reconstruct` on all
views), `chunked` (`reconstruct_chunked`: the merged result of all views is kept, so it grows with N), `streamed`
(`stream_reconstruction`, each chunk dropped once done, as a consumer writing chunks to disk would: memory set by the
chunk alone) and `exported` (`stream_reconstruction` into `export.streaming.StreamingSceneWriter`: depth maps per
chunk, cameras, PLY and GLB at the end under a 200,000-point budget, in a temporary folder).

    python benchmarks/bench_chunked.py                                 # the README table (about 10 minutes, 2 cores)
    python benchmarks/bench_chunked.py --views 8 16 --side 56          # a quick look
    python benchmarks/bench_chunked.py --modes one_pass --attention eager   # one pass with eager's dense mask

bfloat16 rows are added only when the CPU has bfloat16 units (AVX512-BF16 or AMX): without them PyTorch emulates
bf16 and the figures would say nothing about bf16 hardware. Their speed ratio to float32 and the relative distance
of their world points to float32's are printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import TINY, PromptProcessor

from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration
from g2vlm_hf.chunked import reconstruct_chunked, stream_reconstruction
from g2vlm_hf.export.streaming import StreamingSceneWriter

MODES = ("one_pass", "chunked", "streamed", "exported")


class PixelColours:
    """Stands in for the geometry image processor's `unnormalize` (the views here are random, not images)."""

    @staticmethod
    def unnormalize(pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.clamp(-2, 2) * 63 + 128).round().to(torch.uint8).movedim(-3, -1)


def random_views(count: int, height: int, width: int):
    """`count` random views made one at a time (a lazy source, like video frames)."""
    for index in range(count):
        yield torch.randn(3, height, width, generator=torch.Generator().manual_seed(index))


def bf16_units() -> str | None:
    """The CPU flag that gives bfloat16 arithmetic units (AMX or AVX512-BF16), or None."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process: build the model, reconstruct once, print a JSON line."""
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit_gb << 30, resource.RLIM_INFINITY))
    torch.manual_seed(0)
    config = G2VLMConfig(**TINY)
    model = G2VLMForConditionalGeneration._from_config(config, dtype=getattr(torch, args.dtype)).eval()
    model.geometry_heads.float()
    model.set_attn_implementation(args.attention)
    processor = PromptProcessor(config)
    views = random_views(args.views[0], args.side, args.side)
    with torch.inference_mode():  # warm-up: one-time kernel and allocator set-up stays out of the timing
        model.reconstruct(**processor(list(random_views(2, args.side, args.side))))
    start = time.perf_counter()
    with torch.inference_mode():
        if args.mode == "chunked":
            output = reconstruct_chunked(model, processor, views, args.chunk_size, args.overlap)
        elif args.mode == "streamed":
            for chunk in stream_reconstruction(model, processor, views, args.chunk_size, args.overlap):
                output = chunk.reconstruction
        elif args.mode == "exported":
            with tempfile.TemporaryDirectory() as folder, StreamingSceneWriter(folder, max_points=200_000) as writer:
                for chunk in stream_reconstruction(model, processor, views, args.chunk_size, args.overlap):
                    writer.add_chunk(chunk, PixelColours)
                    output = chunk.reconstruction
        else:
            output = model.reconstruct(**processor(list(views)))
    seconds = time.perf_counter() - start
    if args.save:
        torch.save(output.world_points, args.save)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    attention = model.config.text_config._attn_implementation  # what the decoder ran, not what was asked for
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib, "attention": attention}))


def measure(args: argparse.Namespace, views: int, mode: str, dtype: str, save: Path | None) -> dict:
    command = [sys.executable, __file__, "--worker", "--views", str(views), "--side", str(args.side), "--dtype", dtype,
               "--mode", mode, "--chunk-size", str(args.chunk_size), "--overlap", str(args.overlap),
               "--memory-limit-gb", str(args.memory_limit_gb), "--attention", args.attention]  # fmt: skip
    command += ["--save", str(save)] if save else []
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        return {"status": f"too slow (> {args.time_limit:.0f} s)"}
    if run.returncode != 0:
        out_of_memory = "MemoryError" in run.stderr or "alloc" in run.stderr.lower() or run.returncode < 0
        reason = f"does not fit (> {args.memory_limit_gb} GiB)" if out_of_memory else "failed"
        return {"status": reason, "error": run.stderr.strip().splitlines()[-1:]}
    return {"status": "ok", **json.loads(run.stdout.strip().splitlines()[-1])}


def cell(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status']:>24}"
    return f"{result['seconds']:>9.2f} s {result['peak_rss_gib']:>7.2f} GiB  "


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--side", type=int, default=112, help="square views of this many pixels (multiple of 14)")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--memory-limit-gb", type=int, default=8, help="address-space limit of each configuration")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds allowed to each configuration")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:3]))
    parser.add_argument(
        "--attention", default="sdpa", choices=("sdpa", "eager"),
        help="the decoder's attention (eager builds the dense tokens x tokens mask: its one-pass memory is quadratic)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return []

    units = bf16_units()
    dtypes = ["float32", "bfloat16"] if units else ["float32"]
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads; bfloat16 "
          f"{'units: ' + units if units else 'rows left out: no AVX512-BF16 or AMX units (bf16 would be emulated)'}")  # fmt: skip
    print(f"tiny config, {args.attention} attention, {args.side}x{args.side} views, chunks of {args.chunk_size} sharing {args.overlap}; "
          f"limits per run {args.memory_limit_gb} GiB, {args.time_limit:.0f} s")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for views in args.views:
            for dtype in dtypes:
                row = {"views": views, "dtype": dtype}
                for mode in args.modes:
                    save = Path(folder) / f"{views}-{mode}-{dtype}.pt" if units else None
                    row[mode] = measure(args, views, mode, dtype, save)
                    if dtype == "bfloat16" and row[mode]["status"] == "ok":
                        fp32 = torch.load(Path(folder) / f"{views}-{mode}-float32.pt")
                        bf16 = torch.load(save)
                        row[mode]["distance_to_fp32"] = float((bf16 - fp32).norm() / fp32.norm())
                rows.append(row)
                print(
                    f"{views:>6} {dtype:<9} " + " ".join(f"{mode} {cell(row[mode])}" for mode in args.modes), flush=True
                )
    print(f"\nchunks of {args.chunk_size} views sharing {args.overlap}\n| views | dtype | "
          + " | ".join(f"{mode}: time | {mode}: peak RSS" for mode in args.modes) + " |")  # fmt: skip
    print("|---:|---|" + "---:|---:|" * len(args.modes))
    for row in rows:
        cells = []
        for mode in args.modes:
            result = row[mode]
            ok = result["status"] == "ok"
            cells += [
                f"{result['seconds']:.2f} s" if ok else result["status"],
                f"{result['peak_rss_gib']:.2f} GiB" if ok else "-",
            ]
        print(f"| {row['views']} | {row['dtype']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
