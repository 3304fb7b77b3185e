"""Where the trunk's time goes, by operator: one decoder forward of a reconstruction under torch's profiler.

The stage rows of `profile_stages.py` say that the trunk (the two-expert decoder) runs at a multiple of its floor;
this says on what: the device time of matrix products, attention kernels, copies and gathers (expert routing, dtype
casts, packing of the varlen runs) and the remaining element-wise work (norms, RoPE, activations, residuals), the
number of kernels launched, and the time the device sat idle within the call (wall time minus kernel time: host work
and launch gaps). On the CPU the same rows hold host time per operator.

    python benchmarks/trunk_ops.py                 # full size on CUDA (bf16), 16 views 518x518
    python benchmarks/trunk_ops.py --size small    # real widths, one layer (CPU: 4 views 518x392)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import profile_stages

# operator kinds, by the aten name of the op that launched a kernel; the first match wins, the rest is "element-wise"
OP_KINDS = (
    ("attention", ("attention", "flash", "varlen", "efficient", "fmha", "flex")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::linear")),
    ("copies", ("aten::copy_", "aten::index_select", "aten::index_copy_", "aten::cat", "aten::_to_copy",
                "aten::gather", "aten::scatter", "aten::index", "aten::clone", "aten::repeat_interleave")),
)  # fmt: skip


def op_kind(name: str) -> str:
    for kind, patterns in OP_KINDS:
        if any(pattern in name for pattern in patterns):
            return kind
    return "element-wise"


def decoder_call(model, inputs: dict):
    """The decoder's own forward as `reconstruct(**inputs)` calls it: a function of no arguments."""
    decoder = model.model.language_model
    captured = {}

    def keep(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = decoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.reconstruct(**inputs)
    finally:
        handle.remove()
    args, kwargs = captured["call"]
    return lambda: decoder(*args, **kwargs)


def trunk_ops(model, inputs: dict, device: torch.device, top: int = 12) -> dict:
    """Wall time of one decoder forward (the median of three), and its operators' time by kind (ms), kernel launches
    and the device's idle time, from one profiled forward."""
    call = decoder_call(model, inputs)
    cuda = device.type == "cuda"
    walls = []
    with torch.inference_mode():
        call()  # warm-up
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize(device)
            walls.append(time.perf_counter() - start)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as profiler:
            call()
            if cuda:
                torch.cuda.synchronize(device)
    events = profiler.key_averages()
    ops = [event for event in events if event.device_type == DeviceType.CPU and event.key.startswith("aten::")]

    def self_ms(event) -> float:
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3

    by_kind: dict[str, float] = {}
    for event in ops:
        by_kind[op_kind(event.key)] = by_kind.get(op_kind(event.key), 0.0) + self_ms(event)
    wall_ms = sorted(walls)[1] * 1e3
    busy_ms = sum(by_kind.values())
    ranked = sorted(ops, key=self_ms, reverse=True)[:top]
    return {
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "idle_ms": wall_ms - busy_ms if cuda else None,
        "kernels": sum(event.count for event in events if event.device_type == DeviceType.CUDA) if cuda else None,
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "top": [{"op": event.key, "ms": self_ms(event), "calls": event.count} for event in ranked],
    }


def format_ops(result: dict) -> str:
    idle = "" if result["idle_ms"] is None else f", device idle {result['idle_ms']:.1f} ms"
    kernels = "" if result["kernels"] is None else f", {result['kernels']} kernels"
    lines = [f"decoder forward {result['wall_ms']:.1f} ms; operators {result['busy_ms']:.1f} ms{idle}{kernels}"]
    lines += [f"  {kind:<13} {ms:>9.2f} ms {ms / result['busy_ms']:>6.1%}" for kind, ms in result["by_kind_ms"].items()]
    lines += [f"    {row['op']:<45} {row['ms']:>9.2f} ms {row['calls']:>6} calls" for row in result["top"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["tiny", "small", "full"], help="default: full on CUDA, small on the CPU")
    parser.add_argument("--views", type=int, help="default: 16 on CUDA, 4 on the CPU")
    parser.add_argument("--height", type=int, help="default: 518 on CUDA, 392 on the CPU")
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of the model")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = profile_stages.config_for(args.size or ("full" if cuda else "small"))
    views, height = args.views or (16 if cuda else 4), args.height or (518 if cuda else 392)
    model = bench_gpu.build_model(config, device, getattr(torch, args.dtype or "bfloat16"), args.attn)
    scene = [torch.randn(3, height, args.width) for _ in range(views)]
    inputs = bench_gpu.PromptProcessor(config)(scene).to(device)
    result = trunk_ops(model, inputs, device)
    print(f"{views} views {args.width}x{height}, {args.dtype or 'bfloat16'}, attention {args.attn}")
    print(format_ops(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
