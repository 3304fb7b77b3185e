"""Where the time of a reconstruction goes: each stage (geometry encoder, semantic encoder, trunk, each geometry head,
the intrinsics fit) timed inside one `reconstruct()` call, beside its FLOPs, bytes and floor from `costs.py`.

Stages are timed with forward hooks on their modules (CUDA events on a GPU, the host clock on the CPU), so the model
runs unchanged; "other" is the rest of the call (embedding, positions, block layout, gathering the geometry tokens, the
heads' activations and the point transform). The heads run in float32 as in the official code: on CUDA that is TF32
or true fp32 by torch's global flag, so the GPU rows are given for both.

    python benchmarks/profile_stages.py                       # full size on CUDA (bf16 trunk), 16 views 518x518
    python benchmarks/profile_stages.py --size small          # real widths, one layer per part (CPU: 2 views 224x224)
    python benchmarks/profile_stages.py --size tiny           # the tiny test config, seconds on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
from costs import StagePrecision, stage_costs

import g2vlm_hf.modeling.modeling_g2vlm as modeling_g2vlm
from g2vlm_hf import G2VLMConfig

# stage -> the modules (paths from the task model) whose calls it sums
STAGE_MODULES = {
    "geometry encoder": ("model.geometry_encoder", "model.geometry_projector"),
    "semantic encoder": ("model.visual",),
    "trunk": ("model.language_model",),
    "point head": ("geometry_heads.point_decoder", "geometry_heads.point_head"),
    "camera head": ("geometry_heads.camera_decoder", "geometry_heads.camera_head"),
    "global points head": ("geometry_heads.global_points_decoder", "geometry_heads.global_point_head"),
    "confidence head": ("geometry_heads.confidence_decoder", "geometry_heads.confidence_head"),
}

# Real widths (decoder 1536, DINOv2-L 1024, ViT 1280, heads 1536 wide with 16 heads), one layer per part: per-layer
# costs of the full model at a size a CPU can run. Marker ids inside the small vocabulary.
SMALL = {
    "text_config": {"vocab_size": 2000, "num_hidden_layers": 1, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "vision_config": {"depth": 1, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "patch_size": 14,
                      "hidden_act": "quick_gelu"},
    "geometry_config": {"hidden_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 16, "patch_size": 14,
                        "image_size": 518, "num_register_tokens": 4, "layer_norm_eps": 1e-6, "layerscale_value": 1.0},
    "image_token_id": 1996, "geometry_token_id": 1997, "vision_start_token_id": 1998, "vision_end_token_id": 1999,
    "head_depth": 1, "use_confidence_head": True,
}  # fmt: skip

TINY = {
    **bench_gpu.TINY,
    "text_config": {**bench_gpu.TINY["text_config"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "use_confidence_head": True,
}


def config_for(size: str) -> G2VLMConfig:
    """`tiny` (the test config), `small` (real widths, one layer per part) or `full` (G²VLM-2B)."""
    return {"tiny": lambda: G2VLMConfig(**TINY), "small": lambda: G2VLMConfig(**SMALL), "full": G2VLMConfig}[size]()


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


class _Clock:
    """Stamps on the device's timeline: CUDA events (read after one synchronize) or the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


@contextmanager
def stage_hooks(model: torch.nn.Module, device: torch.device) -> Iterator[dict[str, list]]:
    """Record (start, end) stamps of every call of each stage's modules, and of the intrinsics fit, while inside."""
    clock = _Clock(device)
    spans: dict[str, list] = {}
    handles = []
    for stage, paths in STAGE_MODULES.items():
        for path in paths:
            module = _submodule(model, path)
            if module is None:
                continue

            def before(module, args, stage=stage, key=path):
                spans.setdefault(f"open {key}", []).append(clock.stamp())

            def after(module, args, output, stage=stage, key=path):
                spans.setdefault(stage, []).append((spans[f"open {key}"].pop(), clock.stamp()))

            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
    fit = modeling_g2vlm.estimate_intrinsics

    def timed_fit(*args, **kwargs):
        start = clock.stamp()
        result = fit(*args, **kwargs)
        spans.setdefault("intrinsics", []).append((start, clock.stamp()))
        return result

    modeling_g2vlm.estimate_intrinsics = timed_fit
    try:
        yield spans
    finally:
        modeling_g2vlm.estimate_intrinsics = fit
        for handle in handles:
            handle.remove()


def profile_call(model, run: Callable[[], object], device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Seconds per stage of the call with the median total of `repeats` calls of `run()` (after one warm-up call), with
    "total" and "other" (the rest of the call)."""
    clock = _Clock(device)
    run()
    calls = []
    for _ in range(repeats):
        with stage_hooks(model, device) as spans:
            start = clock.stamp()
            run()
            end = clock.stamp()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        stages = {
            name: sum(clock.seconds(a, b) for a, b in pairs)
            for name, pairs in spans.items()
            if not name.startswith("open ")
        }
        stages["total"] = clock.seconds(start, end)
        stages["other"] = stages["total"] - sum(value for name, value in stages.items() if name != "total")
        calls.append(stages)
    return sorted(calls, key=lambda stages: stages["total"])[len(calls) // 2]


def measure_peaks(device: torch.device, half: torch.dtype, size: int) -> tuple[dict[str, float], float]:
    """Matmul FLOP/s of the half-precision dtype and of float32 (under the current TF32 flag), and copy bandwidth."""
    half_flops, bandwidth = bench_gpu.measure_peaks(device, half, size)
    float_flops, _ = bench_gpu.measure_peaks(device, torch.float32, size)
    return {"half": half_flops, "float32": float_flops}, bandwidth


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def stage_rows(config: G2VLMConfig, times: dict[str, float], views: int, height: int, width: int, peaks, bandwidth,
               precision: StagePrecision) -> list[dict]:  # fmt: skip
    """One row per stage: measured seconds, FLOPs, bytes, floor, time over floor and share of the call."""
    costs = {stage.name: stage for stage in stage_costs(config, views, height, width, precision=precision)}
    return stage_rows_from(costs, times, peaks, bandwidth)


def stage_rows_from(costs: dict, times: dict[str, float], peaks, bandwidth) -> list[dict]:
    rows = []
    for name, seconds in times.items():
        row = {"stage": name, "seconds": seconds, "share": seconds / times["total"] if times["total"] else float("nan")}
        cost = costs.get(name)
        if cost is not None:
            floor = cost.floor(peaks, bandwidth)
            row.update(gflop=cost.flops / 1e9, mbytes=cost.bytes / 1e6, floor=floor, over_floor=seconds / floor)
        rows.append(row)
    return rows


def profile_reconstruction(model, config: G2VLMConfig, device: torch.device, views: int, height: int, width: int,
                           repeats: int, peaks, bandwidth, precision: StagePrecision) -> list[dict]:  # fmt: skip
    """Stage rows of reconstructing one scene of random views."""
    inputs = bench_gpu.PromptProcessor(config)([torch.randn(3, height, width) for _ in range(views)]).to(device)
    with torch.inference_mode():
        times = profile_call(model, lambda: model.reconstruct(**inputs), device, repeats)
    return stage_rows(config, times, views, height, width, peaks, bandwidth, precision)


def chat_inputs(
    config: G2VLMConfig, views: int, height: int, width: int, image_side: int, device: torch.device
) -> dict:
    """A chat prefill: 8 text tokens, the geometry block of `views` random views and one semantic image."""
    patch = config.geometry_patch_size
    geometry = [config.vision_start_token_id, *[config.geometry_token_id] * ((height // patch) * (width // patch)),
                config.vision_end_token_id] * views  # fmt: skip
    vision = config.vision_config
    grid = (image_side // vision.patch_size) // vision.spatial_merge_size * vision.spatial_merge_size
    image = [config.vision_start_token_id, *[config.image_token_id] * (grid * grid // vision.spatial_merge_size**2),
             config.vision_end_token_id]  # fmt: skip
    values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9, *geometry, *image]], device=device),
        "geometry_pixel_values": torch.randn(1, views, 3, height, width, device=device),
        "pixel_values": torch.randn(grid * grid, values, device=device),
        "image_grid_thw": torch.tensor([[1, grid, grid]], device=device),
    }


def profile_chat(model, config: G2VLMConfig, device: torch.device, views: int, height: int, width: int, image_side: int,
                 repeats: int, peaks, bandwidth, precision: StagePrecision) -> list[dict]:  # fmt: skip
    """Stage rows of a chat prefill (geometry views and one semantic image, the last token's logits)."""
    inputs = chat_inputs(config, views, height, width, image_side, device)
    with torch.inference_mode():
        times = profile_call(model, lambda: model(**inputs, logits_to_keep=1), device, repeats)
    costs = {stage.name: stage for stage in stage_costs(config, views, height, width, images=1, image_side=image_side,
                                                        precision=precision)}  # fmt: skip
    return stage_rows_from(costs, times, peaks, bandwidth)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'stage':<20} {'ms':>9} {'share':>6} {'GFLOP':>10} {'MB':>9} {'floor ms':>9} {'x floor':>8}"]
    for row in rows:
        extra = ""
        if "floor" in row:
            extra = f"{row['gflop']:>10.4g} {row['mbytes']:>9.4g} {row['floor'] * 1e3:>9.4g} {row['over_floor']:>8.1f}"
        lines.append(f"{row['stage']:<20} {row['seconds'] * 1e3:>9.2f} {row['share']:>6.1%} {extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["tiny", "small", "full"], help="default: full on CUDA, small on the CPU")
    parser.add_argument("--views", type=int, help="default: 16 on CUDA, 2 on the CPU")
    parser.add_argument("--height", type=int, help="default: 518 on CUDA, 224 on the CPU")
    parser.add_argument("--width", type=int, help="default: 518 on CUDA, 224 on the CPU")
    parser.add_argument(
        "--image-side", type=int, help="semantic image of the chat row; default: 768 on CUDA, 224 on the CPU"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", help="attention implementation of the model")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or ("full" if cuda else "small")
    views = args.views or (16 if cuda else 2)
    height, width = args.height or (518 if cuda else 224), args.width or (518 if cuda else 224)
    args.image_side = args.image_side or (768 if cuda else 224)
    half = torch.bfloat16 if cuda else torch.float32
    config = config_for(size)
    model = bench_gpu.build_model(config, device, half, args.attn)
    precision = StagePrecision() if cuda else StagePrecision.float32()
    results = {"device": torch.cuda.get_device_name(device) if cuda else "CPU", "size": size, "views": views,
               "height": height, "width": width, "runs": {}}  # fmt: skip
    for tf32 in (True, False) if cuda else (False,):
        set_tf32(tf32)
        peaks, bandwidth = measure_peaks(device, half, 8192 if cuda else 1024)
        label = f"TF32 {'on' if tf32 else 'off'}" if cuda else "CPU float32"
        print(f"{size} config, {label}; peaks {peaks['half'] / 1e12:.2f} TFLOP/s half, {peaks['float32'] / 1e12:.2f} "
              f"float32, {bandwidth / 1e9:.0f} GB/s")  # fmt: skip
        rows = profile_reconstruction(
            model, config, device, views, height, width, args.repeats, peaks, bandwidth, precision
        )
        print(f"reconstruction, {views} views {width}x{height}\n{format_rows(rows)}")
        chat = profile_chat(model, config, device, 2, height, width, args.image_side, args.repeats, peaks, bandwidth,
                            precision)  # fmt: skip
        print(f"chat prefill, 2 views {width}x{height} + one {args.image_side}px image\n{format_rows(chat)}")
        results["runs"][label] = {"peaks": {**peaks, "bandwidth": bandwidth}, "reconstruction": rows, "chat": chat}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
