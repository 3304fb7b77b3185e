"""GPU benchmark of G²VLM-2B with random weights created on the device (nothing downloaded), each figure beside its
floor for the device it finds: time >= max(FLOPs / peak FLOP/s, bytes / peak bandwidth), with the peaks measured on
that device (a large matmul in the benchmark's dtype, a large copy).

Rows, per attention backend (sdpa, torch_varlen on CUDA with torch >= 2.10, flex_attention, and flash_attention_2 when
flash_attn imports; in bfloat16/float16 on CUDA the default sdpa runs prompts with images on torch's varlen kernel too,
so its sdpa-by-query-slices path shows in float32):
- reconstruction of 16 views of 518x518: latency and peak memory;
- the largest view count that fits (doubling from 16 until out of memory or the time budget);
- prefill tok/s with 1024 prompt tokens and decode tok/s after them, at batch 1 and 8;
- reconstruction of 10, 50, 100 and 200 frames of 518x392, in one pass and in chunks of 32 views sharing 8 (the frame
  counts of VGGT's README table; VGGT on one H100: 100 frames 3.12 s / 21.15 GB, 200 frames 8.75 s / 40.63 GB).

    python benchmarks/bench_gpu.py                      # CUDA, bf16, full size; about 3-4 minutes on one H100
    python benchmarks/bench_gpu.py --tiny --device cpu  # a tiny config on the CPU, to check the script runs

Goals on one H100: 16-view reconstruction <= 0.27 s (floor about 0.18 s); decode at batch 1 >= 540 tok/s (floor about
1,080 tok/s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from costs import decode_bytes_per_token, decoder_flops, reconstruction_flops
from transformers import BatchFeature

from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration
from g2vlm_hf.chunked import plan_chunks, reconstruct_chunked

TINY = {
    "text_config": {
        "vocab_size": 100, "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    },
    "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 128, "num_heads": 2, "patch_size": 14},
    "geometry_config": {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_register_tokens": 4, "patch_size": 14,
        "image_size": 56,
    },
    "image_token_id": 96, "geometry_token_id": 97, "vision_start_token_id": 98, "vision_end_token_id": 99,
    "head_depth": 1, "head_num_attention_heads": 4, "point_head_hidden_size": 48, "camera_head_hidden_size": 32,
}  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> tuple[float, float]:
    """Achievable matmul FLOP/s in `dtype` and copy bandwidth (bytes/s) of `device`."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    flops = 2.0 * size**3 / best_time(lambda: a @ b, device, repeats)
    elements = (1 << 28) if device.type == "cuda" else (1 << 24)
    source, target = torch.empty(elements, device=device), torch.empty(elements, device=device)
    bandwidth = 2.0 * elements * 4 / best_time(lambda: target.copy_(source), device, repeats)
    return flops, bandwidth


def plain_text_ids(config: G2VLMConfig) -> int:
    """The exclusive bound of the token ids that random text prompts draw from: below every placeholder and vision
    marker, so that no random token starts an image or a geometry block."""
    special = (
        config.image_token_id,
        config.geometry_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    )
    return min(1000, config.text_config.vocab_size, *special)


def build_model(config: G2VLMConfig, device: torch.device, dtype: torch.dtype, implementation: str):
    """Random weights created and initialised directly on `device` (no CPU copy of the full model), in `dtype`
    but for the geometry heads, which stay in float32 as when loading."""
    config = G2VLMConfig.from_dict(config.to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = G2VLMForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=implementation)
    model.geometry_heads.float()
    return model.eval()


def reconstruction_inputs(config: G2VLMConfig, views: int, side: int, device: torch.device) -> dict:
    grid = side // config.geometry_patch_size
    block = [config.vision_start_token_id, *[config.geometry_token_id] * grid * grid, config.vision_end_token_id]
    ids = torch.tensor([[1, 2, 3, 4, 5, *block * views]], device=device)
    pixels = torch.randn(1, views, 3, side, side, device=device)
    return {"input_ids": ids, "geometry_pixel_values": pixels}


class PromptProcessor:
    """Builds the reconstruction prompt for a list of `(3, H, W)` pixel tensors from the config's token ids: what
    `G2VLMProcessor(geometry_images=...)` returns, for random weights that come without a tokenizer."""

    def __init__(self, config: G2VLMConfig):
        self.config = config

    def __call__(self, geometry_images: list[torch.Tensor], return_tensors: str = "pt") -> BatchFeature:
        pixels = torch.stack(list(geometry_images))[None]
        patch = self.config.geometry_patch_size
        tokens = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        block = [
            self.config.vision_start_token_id,
            *[self.config.geometry_token_id] * tokens,
            self.config.vision_end_token_id,
        ]
        input_ids = torch.tensor([[1, 2, 3, 4, 5, *block * pixels.shape[1]]], device=pixels.device)
        return BatchFeature({"input_ids": input_ids, "geometry_pixel_values": pixels})


def bench_frames(model, config: G2VLMConfig, args, device: torch.device, flops_peak: float) -> list[dict]:
    """Reconstruction of each of `args.frames` frames in one pass and in chunks (views made on the host, as when
    read from a video; the chunked results come back to the host)."""
    rows = []
    processor = PromptProcessor(config)
    width, height = args.frame_width, args.frame_height
    for frames in args.frames:
        views = [torch.randn(3, height, width) for _ in range(frames)]
        chunks = [len(chunk) for chunk, _ in plan_chunks(range(frames), args.chunk_size, args.overlap)]
        for mode, run, flops in (
            ("one pass", lambda views=views: model.reconstruct(**processor(views).to(device)),
             reconstruction_flops(config, frames, height, width)),
            (f"chunks of {args.chunk_size}/{args.overlap}",
             lambda views=views: reconstruct_chunked(model, processor, views, args.chunk_size, args.overlap),
             sum(reconstruction_flops(config, size, height, width) for size in chunks)),
        ):  # fmt: skip
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            row = {"row": f"{frames} frames {width}x{height}, {mode}", "unit": "s", "floor": flops / flops_peak}
            try:
                with torch.inference_mode():
                    row["value"] = best_time(run, device, repeats=1)
                row["peak_memory_gib"] = (
                    torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                )
            except torch.OutOfMemoryError:
                row.update(value=float("nan"), unit="OOM")
            rows.append(row)
    return rows


def bench_backend(model, config: G2VLMConfig, args, device: torch.device, peaks: tuple[float, float]) -> list[dict]:
    flops_peak, bandwidth = peaks
    rows = []
    views, side = args.views, args.side
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        inputs = reconstruction_inputs(config, views, side, device)
        seconds = best_time(lambda: model.reconstruct(**inputs), device, args.repeats)
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        floor = reconstruction_flops(config, views, side, side) / flops_peak
        rows.append({"row": f"reconstruction, {views} views {side}x{side}", "value": seconds, "unit": "s",
                     "floor": floor, "peak_memory_gib": memory})  # fmt: skip

        largest, count, deadline = views, views, time.perf_counter() + args.fit_seconds
        while time.perf_counter() < deadline and count <= args.max_views:
            count *= 2
            try:
                model.reconstruct(**reconstruction_inputs(config, count, side, device))
                synchronize(device)
                largest = count
            except torch.OutOfMemoryError:
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append({"row": "largest view count that fits (doubling)", "value": largest, "unit": "views",
                     "floor": float("nan")})  # fmt: skip

        text_ids = plain_text_ids(config)
        for batch in (1, 8):
            ids = torch.randint(0, text_ids, (batch, args.context), device=device)
            seconds = best_time(lambda ids=ids: model(input_ids=ids, logits_to_keep=1), device, args.repeats)
            floor = decoder_flops(config, batch * args.context) / flops_peak
            rows.append({"row": f"prefill, batch {batch}, {args.context} tokens", "value": batch * args.context / seconds,
                         "unit": "tok/s", "floor": batch * args.context / floor})  # fmt: skip

            def generate(new_tokens: int, ids=ids) -> None:
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False,
                )  # fmt: skip

            # decode time: generating `decode_steps` tokens minus generating one (prefill + first token)
            seconds = best_time(lambda: generate(args.decode_steps), device, args.repeats)
            seconds -= best_time(lambda: generate(1), device, args.repeats)
            bytes_per_token = decode_bytes_per_token(config, args.context, batch, bytes_per_value=2)
            rows.append({"row": f"decode, batch {batch}, after {args.context} tokens",
                         "value": batch * (args.decode_steps - 1) / max(seconds, 1e-9), "unit": "tok/s",
                         "floor": batch * bandwidth / bytes_per_token})  # fmt: skip
    return rows + bench_frames(model, config, args, device, flops_peak)


def available_backends(device: torch.device) -> list[str]:
    backends = ["sdpa", "flex_attention"]
    if device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        backends.insert(1, "torch_varlen")
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    return backends


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="a tiny config (to check the script on a CPU)")
    parser.add_argument(
        "--backends",
        nargs="+",
        help="default: sdpa, torch_varlen (CUDA), flex_attention, flash_attention_2 if importable",
    )
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--side", type=int, default=518)
    parser.add_argument("--max-views", type=int, default=256)
    parser.add_argument("--fit-seconds", type=float, default=40.0, help="time budget of the largest-fit search")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--frames", type=int, nargs="*", default=[10, 50, 100, 200], help="frame counts of the frame table"
    )
    parser.add_argument("--frame-width", type=int, default=518)
    parser.add_argument("--frame-height", type=int, default=392)
    parser.add_argument("--chunk-size", type=int, default=32, help="views per chunk in the frame table")
    parser.add_argument("--overlap", type=int, default=8, help="views shared by consecutive chunks in the frame table")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = G2VLMConfig(**TINY) if args.tiny else G2VLMConfig()
    peaks = measure_peaks(device, dtype, size=8192 if device.type == "cuda" else 512)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; measured peaks: {peaks[0] / 1e12:.1f} TFLOP/s ({args.dtype}), {peaks[1] / 1e9:.0f} GB/s")
    rows = []
    for backend in args.backends or available_backends(device):
        model = build_model(config, device, dtype, backend)
        for row in bench_backend(model, config, args, device, peaks):
            rows.append({"backend": backend, **row})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'backend':<18} {'benchmark':<42} {'measured':>14} {'floor':>14}  peak memory")
    for row in rows:
        memory = row.get("peak_memory_gib", float("nan"))
        memory = f"{memory:.1f} GiB" if memory == memory else ""  # NaN (no CUDA) prints nothing
        print(
            f"{row['backend']:<18} {row['row']:<42} {row['value']:>10.4g} {row['unit']:<5} {row['floor']:>10.4g}  {memory}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
