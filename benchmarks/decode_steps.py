"""Where a decode step's time goes: the decode steps of one `generate()` call under torch's profiler.

gpu_check's decode rows give tok/s against a bandwidth floor (on the H200, 236 tok/s at batch 1 against 1,305: 4.2 ms
a step where the weights take 0.77 ms to read). This splits a step's wall time into the host time inside the compiled
model call (dynamo's guards, AOT wrappers, CUDA-graph replay or kernel launches), the device's busy time (its
kernels), and how many kernels, CUDA-graph replays and host reads of a device value (`.item()`, a sync on CUDA) each
step makes. Only the decode steps are profiled: the window opens after the prompt's token and closes at the last one.

    python benchmarks/decode_steps.py                      # full size on CUDA (bf16), tiny config on the CPU
    python benchmarks/decode_steps.py --size tiny --cache static
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
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import profile_stages

COMPILED_REGION = "Torch-Compiled Region"
HOST_READ = "aten::_local_scalar_dense"  # what `.item()`, `bool(tensor)` and `float(tensor)` call
GRAPH_REPLAY = "cudaGraphLaunch"
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


class ProfileDecodeSteps(StoppingCriteria):
    """Starts `profiler` when the prompt's token is out (the first call) and stamps the host clock after every
    token; never stops generation."""

    def __init__(self, profiler: profile, sync):
        self.profiler, self.sync, self.stamps = profiler, sync, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.sync()
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.profiler.start()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_steps(model, input_ids: torch.LongTensor, new_tokens: int, **generate_kwargs) -> dict:
    """Per decode step of `model.generate(input_ids, ...)` (a warm-up call first, which compiles where generate
    compiles): wall ms, host ms inside compiled regions, device busy ms, kernels, CUDA-graph replays, host reads.
    A `stopping_criteria` in `generate_kwargs` runs beside the one that opens the profiler."""
    if new_tokens < 2:
        raise ValueError(f"decode_steps needs at least 2 new tokens (one decode step), got {new_tokens}")
    cuda = input_ids.device.type == "cuda"
    own_criteria = list(generate_kwargs.pop("stopping_criteria", None) or [])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(input_ids.device)

    def generate(stopping_criteria: list) -> None:
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList(own_criteria + stopping_criteria), **generate_kwargs)  # fmt: skip

    with torch.inference_mode():
        generate([])
        profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        clock = ProfileDecodeSteps(profiler, sync)
        try:
            generate([clock])
            sync()
        finally:
            profiler.stop()
    steps = len(clock.stamps) - 1
    events = profiler.key_averages()

    def host_ms(prefixes: tuple[str, ...]) -> float:
        return sum(e.cpu_time_total for e in events if e.key.startswith(prefixes) and e.device_type == DeviceType.CPU)

    def calls(names: tuple[str, ...]) -> int:
        return sum(e.count for e in events if e.key in names and e.device_type == DeviceType.CPU)

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    return {
        "steps": steps,
        "wall_ms": 1e3 * (clock.stamps[-1] - clock.stamps[0]) / steps,
        "compiled_region_host_ms": host_ms((COMPILED_REGION,)) / 1e3 / steps,
        "device_busy_ms": sum(e.self_device_time_total for e in kernels) / 1e3 / steps if cuda else None,
        "kernels": sum(e.count for e in kernels) / steps if cuda else None,
        "kernel_launches": calls(KERNEL_LAUNCHES) / steps,
        "graph_replays": calls((GRAPH_REPLAY,)) / steps,
        "host_reads": calls((HOST_READ,)) / steps,
    }


def format_steps(result: dict) -> str:
    device = (
        ""
        if result["device_busy_ms"] is None
        else (f", device busy {result['device_busy_ms']:.2f} ms ({result['kernels']:.0f} kernels)")
    )
    return (
        f"decode step {result['wall_ms']:.2f} ms: compiled regions' host time {result['compiled_region_host_ms']:.2f} ms"
        f"{device}; per step {result['kernel_launches']:.0f} kernel launches, {result['graph_replays']:.0f} CUDA-graph "
        f"replays, {result['host_reads']:.0f} host reads ({result['steps']} steps)"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["tiny", "small", "full"], help="default: full on CUDA, tiny on the CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--cache", choices=["default", "static", "dynamic"], default="default")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = profile_stages.config_for(args.size or ("full" if cuda else "tiny"))
    model = bench_gpu.build_model(config, device, torch.bfloat16 if cuda else torch.float32, "sdpa")
    ids = torch.randint(3, bench_gpu.plain_text_ids(config), (args.batch, args.context), device=device)
    kwargs = {} if args.cache == "default" else {"cache_implementation": args.cache}
    result = decode_steps(model, ids, args.new_tokens, **kwargs)
    print(f"batch {args.batch}, {args.context} prompt tokens, {args.cache} cache, {device.type}")
    print(format_steps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
