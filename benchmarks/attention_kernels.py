"""The attention kernels torch offers, timed on the trunk's largest attention: the one bidirectional block that holds
every view of a reconstruction.

At 16 views of 518x518 that block is 21,936 tokens and its attention is more than half of the trunk's FLOPs, so the
kernel that runs it sets how close the trunk can come to its floor. The default path hands it to torch's varlen
kernel (FlashAttention 2) on CUDA in half precision; sdpa's own backends (flash, cuDNN, memory-efficient) run the
same unmasked block too. Each kernel gets the same random queries, keys and values (grouped-query heads as the
model's: the sdpa rows repeat the key/value heads inside the timed call, as the varlen adapter does before torch
2.12, a copy of about 135 MB at 16 views against some 3 TFLOP of attention); a row gives its best time, its TFLOP/s,
its share of the measured matmul peak and its relative difference from the first kernel that ran.

    python benchmarks/attention_kernels.py                   # CUDA, bf16, the 16-view block of the full config
    python benchmarks/attention_kernels.py --views 4 --tiny  # the CPU, float32, the tiny config's widths
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import profile_stages
from costs import attention_flops

from g2vlm_hf.modeling.torch_varlen import TORCH_VARLEN_KERNEL, VarlenKernel, varlen_attention

SDPA_BACKENDS = {
    "sdpa flash": SDPBackend.FLASH_ATTENTION,
    "sdpa cuDNN": SDPBackend.CUDNN_ATTENTION,
    "sdpa memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa math": SDPBackend.MATH,
}


def block_tokens(config, views: int, height: int, width: int) -> int:
    """Tokens of the reconstruction prompt's geometry block: each view's patches between its two markers."""
    patch = config.geometry_patch_size
    return views * ((height // patch) * (width // patch) + 2)


VARLEN = "torch varlen (the default path)"


def kernels(varlen_kernel: VarlenKernel | None) -> dict[str, Callable]:
    """name -> fn(query, key, value, scale) on `(tokens, heads, dim)` queries and `(tokens, kv_heads, dim)` keys and
    values, returning `(tokens, heads, dim)`; the varlen row calls `varlen_kernel` through the model's adapter."""

    def varlen(query, key, value, scale):
        bounds = torch.tensor([0, query.shape[0]], dtype=torch.int32, device=query.device)
        return varlen_attention(query, key, value, bounds, bounds, query.shape[0], query.shape[0], causal=False,
                                scale=scale, kernel=varlen_kernel)  # fmt: skip

    def sdpa(backend: SDPBackend) -> Callable:
        def run(query, key, value, scale):
            groups = query.shape[1] // key.shape[1]
            query, key, value = (states.transpose(0, 1)[None] for states in (query, key, value))
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(query, key, value, scale=scale)[0].transpose(0, 1)

        return run

    named = {VARLEN: varlen}
    named.update({name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
    return named


def skip_reason(name: str, device: torch.device, dtype: torch.dtype, varlen_kernel: VarlenKernel | None) -> str | None:
    if name == VARLEN and varlen_kernel is None:
        return "torch < 2.10 has no varlen_attn"
    if name == VARLEN and varlen_kernel is TORCH_VARLEN_KERNEL and device.type != "cuda":
        return "varlen_attn runs on CUDA only"
    if name == VARLEN and dtype not in (torch.bfloat16, torch.float16):
        return "varlen_attn takes bf16/fp16 only"
    if device.type != "cuda" and name in ("sdpa cuDNN", "sdpa memory-efficient"):
        return "a CUDA backend"
    if device.type == "cuda" and name == "sdpa math":
        return "the reference backend: far slower, not a candidate"
    return None


def attention_kernels(
    config,
    device: torch.device,
    dtype: torch.dtype,
    views: int,
    height: int,
    width: int,
    peak_flops: float,
    repeats: int = 5,
    varlen_kernel: VarlenKernel | None = TORCH_VARLEN_KERNEL,
) -> dict:
    """Rows per kernel for the geometry block of `views` views of `height` x `width` (`varlen_kernel`: torch's, or a
    stand-in with its signature)."""
    text = config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = text.hidden_size // heads
    tokens = block_tokens(config, views, height, width)
    generator = torch.Generator(device=device).manual_seed(0)

    def states(count: int) -> torch.Tensor:
        return torch.randn(tokens, count, head_dim, generator=generator, device=device, dtype=dtype)

    query, key, value = states(heads), states(kv_heads), states(kv_heads)
    scale, flops = head_dim**-0.5, attention_flops(tokens, tokens, heads * head_dim)
    rows: dict = {"shape": {"tokens": tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                            "dtype": str(dtype), "gflop": flops / 1e9}}  # fmt: skip
    reference = None
    for name, run in kernels(varlen_kernel).items():
        reason = skip_reason(name, device, dtype, varlen_kernel)
        if reason:
            rows[name] = {"skipped": reason}
            continue
        try:
            with torch.inference_mode():
                output = run(query, key, value, scale)
                seconds = bench_gpu.best_time(lambda run=run: run(query, key, value, scale), device, repeats)
        except RuntimeError as error:  # a backend that refuses this shape, dtype or device says why
            rows[name] = {"skipped": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
            continue
        row = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "of_peak": flops / seconds / peak_flops}
        if reference is None:
            reference, row["reference"] = output.float(), True
        else:
            row["rel_diff"] = float((output.float() - reference).norm() / reference.norm())
        rows[name] = row
    return rows


def format_rows(rows: dict) -> str:
    shape = rows["shape"]
    lines = [f"one block of {shape['tokens']} tokens, {shape['heads']} heads ({shape['kv_heads']} kv) x "
             f"{shape['head_dim']}, {shape['dtype']}: {shape['gflop']:.0f} GFLOP",
             f"{'kernel':<34} {'ms':>9} {'TFLOP/s':>8} {'of peak':>8} {'rel diff':>9}"]  # fmt: skip
    for name, row in rows.items():
        if name == "shape":
            continue
        if "skipped" in row:
            lines.append(f"{name:<34} skipped: {row['skipped']}")
            continue
        diff = "reference" if row.get("reference") else f"{row['rel_diff']:.2e}"
        lines.append(f"{name:<34} {row['ms']:>9.3f} {row['tflops']:>8.1f} {row['of_peak']:>8.2f} {diff:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--height", type=int, default=518)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="the tiny config's widths, float32, on the CPU")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or pass --tiny for the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = profile_stages.config_for("tiny" if args.tiny else "full")
    peak, _ = bench_gpu.measure_peaks(device, dtype, 256 if args.tiny else 8192)
    rows = attention_kernels(config, device, dtype, args.views, args.height, args.width, peak, args.repeats)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
