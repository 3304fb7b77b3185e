"""The project's GPU check: in one call of at most about 8 minutes on one H100/H200, what issue 31's table needed.

Sections (each with its own share of `--budget`; every result is written to OUT/gpu_check.json as soon as it is known,
so a run cut short still returns what it measured; a short table is printed last):

- env     versions, GPU, measured peaks, torch's varlen kernel, which attention backends the installed code accepts
- tiny    the tiny test config on the GPU against the same weights on the CPU (float32, TF32 off): max abs diff of
          logits and world points, greedy tokens equal
- agree   full size, random weights made on the device, 2 views of 518x518 + one image: every backend (eager, sdpa,
          torch_varlen, flash_attention_2 if flash_attn imports, flex_attention) against eager float32 on the GPU,
          relative error of the logits and world points, in float32 and bf16 (bf16 against the float32 reference)
- stages  each stage of a 16-view reconstruction timed with CUDA events beside its FLOPs, bytes and floor
          (benchmarks/profile_stages.py), TF32 on and off, and a chat prefill with one image; the trunk of that
          reconstruction by operator (benchmarks/trunk_ops.py: matmul, attention, copies, element-wise, kernels
          launched, device idle time); the attention kernels torch offers timed on that reconstruction's block of
          views (benchmarks/attention_kernels.py: torch's varlen kernel, sdpa's flash, cuDNN and memory-efficient)
- bench   benchmarks/bench_gpu.py's rows (16 views 518x518, TF32 on and off, and with each decoder layer and head
          block compiled, per stage;
          100 frames 518x392 in one pass;
          200 frames in chunks of 32/8) for sdpa, torch_varlen and flex_attention (fresh, and again after a dozen
          other prompt shapes), time and peak memory beside the floor from costs.py
- decode  tok/s timed per generated token after 1024 prompt tokens, batch 1 and 8, default settings and static cache,
          with the graphs, graph breaks and CUDA-graph skips of the compiled step; the three calls of a row grow by
          32 tokens like chat turns, so a step compiled again for a longer cache shows; one batch-1 step by parts
          (benchmarks/decode_steps.py: host time in the compiled call, device busy time, kernels, CUDA-graph
          replays and host reads per step)
- lora    one LoRA step under bf16 autocast: finite loss and gradients

A backend the installed code does not accept (or that cannot run here: torch_varlen needs CUDA and bf16/fp16,
flash_attention_2 the flash_attn package) is skipped with the reason recorded.

    python benchmarks/gpu_check.py --out DIR [--budget 450] [--sections env tiny ...]
    python benchmarks/gpu_check.py --tiny --out DIR     # a CPU dry run of every section with the tiny config (seconds)
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]  # the project travels as source

import attention_kernels  # noqa: E402
import bench_gpu  # noqa: E402
import decode_steps  # noqa: E402
import profile_stages  # noqa: E402
import trunk_ops  # noqa: E402
from costs import StagePrecision, decode_bytes_per_token, reconstruction_floor, reconstruction_flops  # noqa: E402

from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration  # noqa: E402
from g2vlm_hf.chunked import plan_chunks, reconstruct_chunked  # noqa: E402

SECTIONS = ("env", "tiny", "agree", "stages", "bench", "decode", "lora")
# each section's share of the budget, in seconds of a 420-second run; unused time passes on to the next section
SHARES = {"env": 15, "tiny": 20, "agree": 85, "stages": 30, "bench": 175, "decode": 75, "lora": 20}
BACKENDS = ("eager", "sdpa", "torch_varlen", "flash_attention_2", "flex_attention")


@dataclass
class Sizes:
    """The problem sizes of each section: the issue's on a GPU, tiny ones for the CPU dry run."""

    side: int = 518  # agree and bench: square views
    image_side: int = 224  # agree: the semantic image
    views: int = 16  # bench and stages: the reconstruction rows
    frame_width: int = 518
    frame_height: int = 392
    one_pass_frames: int = 100
    chunked_frames: int = 200
    chunk_size: int = 32
    overlap: int = 8
    mixed_shapes: list = field(
        default_factory=lambda: [(v, 112) for v in range(1, 9)] + [(v, 224) for v in (1, 2, 3, 4)]
    )
    context: int = 1024
    new_tokens: int = 65
    stage_image_side: int = 768
    lora_side: int = 224
    peak_size: int = 8192

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(side=56, image_side=28, views=2, frame_width=56, frame_height=42, one_pass_frames=6,
                   chunked_frames=10, chunk_size=4, overlap=1, mixed_shapes=[(1, 28), (2, 28), (3, 28)], context=32,
                   new_tokens=9, stage_image_side=56, lora_side=56, peak_size=256)  # fmt: skip


class Skip(Exception):
    """A measurement that cannot run here (the reason is recorded instead of a number)."""


class Results:
    """Section -> item -> value, written to `path` (atomically) after every record."""

    def __init__(self, path: Path):
        self.path, self.data, self.lock = path, {}, threading.Lock()

    def put(self, section: str, key: str, value) -> None:
        with self.lock:
            self.data.setdefault(section, {})[key] = clean(value)
            print(f"[{section}] {key}: {json.dumps(clean(value))[:300]}", flush=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(json.dumps(self.data, indent=1))
            os.replace(temporary, self.path)


def clean(value):
    """JSON-ready: NaN and infinities as None, floats to 5 significant digits, tuples as lists."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return clean(value.tolist())
    return value


class Check:
    """The run: device, sizes, results and the time budget of each section."""

    def __init__(self, args):
        self.tiny, self.tiny_flex = args.tiny, args.tiny_flex
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.half = torch.float32 if args.tiny else torch.bfloat16  # the CPU dry run stays in float32 where it times
        self.sizes = Sizes.tiny() if args.tiny else Sizes()
        self.config = profile_stages.config_for("tiny" if args.tiny else "full")
        self.results = Results(args.out / "gpu_check.json")
        self.start = time.monotonic()
        self.end = self.start + args.budget
        self.scale = args.budget / sum(SHARES.values())
        self.deadline = self.end
        self.default_attention = "sdpa"
        self._model = None

    # --- bookkeeping ------------------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def item(self, section: str, key: str, fn: Callable[[], object], needs: float = 0.0):
        """Record `fn()` under `key`, or why it did not run (a skip reason or the error)."""
        if self.left() < needs * (0.02 if self.tiny else 1.0):
            self.results.put(
                section,
                key,
                {"skipped": f"out of this section's time ({self.left():.0f} s left, needs ~{needs:.0f} s)"},
            )
            return None
        try:
            value = fn()
        except Skip as reason:
            value = {"skipped": str(reason)}
        except torch.OutOfMemoryError as error:
            value = {"failed": f"out of memory: {str(error).splitlines()[0][:200]}"}
        except Exception as error:  # a check records what broke and goes on
            traceback.print_exc()
            value = {"failed": f"{type(error).__name__}: {str(error).strip()[:400]}"}
        finally:
            self.empty()
        self.results.put(section, key, value)
        return value

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def empty(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else float("nan")

    def timed(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    # --- models -----------------------------------------------------------------------------------------------------
    def build(self, dtype: torch.dtype, attention: str | None = None) -> G2VLMForConditionalGeneration:
        """Random full-size (or tiny) weights made on the device; the geometry heads in float32, as when loading."""
        config = G2VLMConfig.from_dict(self.config.to_dict())
        torch.manual_seed(0)
        kwargs = {"attn_implementation": attention} if attention else {}
        with torch.device(self.device):
            model = G2VLMForConditionalGeneration._from_config(config, dtype=dtype, **kwargs)
        model.geometry_heads.float()
        return model.eval()

    def shared_model(self) -> G2VLMForConditionalGeneration:
        """One model in the half dtype with the default attention, shared by stages, bench, decode and lora."""
        if self._model is None:
            self._model = self.build(self.half)
        return self._model

    def drop_model(self) -> None:
        self._model = None
        self.empty()

    def usable(self, name: str, dtype: torch.dtype) -> None:
        """Raise Skip for a backend that cannot run in this setting."""
        if name == "flex_attention" and self.tiny and not self.tiny_flex:
            raise Skip(
                "--tiny leaves flex_attention out (on the CPU each shape compiles C++, ~30 s); --tiny-flex adds it"
            )
        if name == "torch_varlen" and (self.device.type != "cuda" or dtype == torch.float32):
            raise Skip("torch's varlen_attn runs on CUDA in bf16/fp16 only")
        if name == "flash_attention_2":
            if importlib.util.find_spec("flash_attn") is None:
                raise Skip("the flash_attn package is not installed")
            if self.device.type != "cuda" or dtype == torch.float32:
                raise Skip("flash-attention runs on CUDA in bf16/fp16 only")

    def select(self, model, name: str, dtype: torch.dtype) -> str:
        """Switch `model` to attention `name`; Skip when it cannot run here or the installed code refuses it. Returns
        the implementation the model then reports."""
        self.usable(name, dtype)
        try:
            model.set_attn_implementation(name)
        except Exception as error:
            raise Skip(
                f"not accepted by the installed code: {type(error).__name__}: {str(error).strip()[:200]}"
            ) from error
        return model.config._attn_implementation


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def prompt_inputs(
    config: G2VLMConfig, views: int, side: int, image_side: int, device, seed: int = 0
) -> tuple[dict, dict]:
    """A chat prompt (text, the geometry block of `views` views, one semantic image, text) and a reconstruction
    prompt of the same views."""
    generator = torch.Generator().manual_seed(seed)
    grid = side // config.geometry_patch_size
    geometry = [
        config.vision_start_token_id,
        *[config.geometry_token_id] * grid * grid,
        config.vision_end_token_id,
    ] * views
    image_grid = image_side // 14 // 2 * 2
    image = [config.vision_start_token_id, *[config.image_token_id] * (image_grid**2 // 4), config.vision_end_token_id]
    plain = bench_gpu.plain_text_ids(config)
    text = torch.randint(3, plain, (24,), generator=generator).tolist()
    pixels = torch.randn(1, views, 3, side, side, generator=generator)
    chat = {
        "input_ids": torch.tensor([text[:12] + geometry + image + text[12:]]),
        "geometry_pixel_values": pixels,
        "pixel_values": torch.randn(image_grid**2, 3 * 2 * 14 * 14, generator=generator),
        "image_grid_thw": torch.tensor([[1, image_grid, image_grid]]),
    }
    recon = {"input_ids": torch.tensor([text[:5] + geometry]), "geometry_pixel_values": pixels}
    return ({k: v.to(device) for k, v in chat.items()}, {k: v.to(device) for k, v in recon.items()})


# --- sections --------------------------------------------------------------------------------------------------------
def section_env(check: Check) -> None:
    put = lambda key, value: check.results.put("env", key, value)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "huggingface_hub", "tokenizers", "safetensors", "accelerate", "peft", "kernels"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    import g2vlm_hf

    versions["g2vlm_hf"] = str(Path(g2vlm_hf.__file__).parent)
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        versions["commit"] = commit.stdout.strip() or None
    except OSError:  # no git on the machine
        versions["commit"] = None
    put("versions", versions)
    if check.device.type == "cuda":
        properties = torch.cuda.get_device_properties(check.device)
        put("gpu", {"name": properties.name, "capability": list(torch.cuda.get_device_capability(check.device)),
                    "memory_gib": properties.total_memory / 2**30, "multiprocessors": properties.multi_processor_count})  # fmt: skip
    else:
        put("gpu", {"skipped": "CPU dry run (--tiny)"})
    try:
        from torch.nn.attention import varlen

        put("varlen_attn", str(inspect.signature(varlen.varlen_attn)))
    except (ImportError, AttributeError) as error:
        put("varlen_attn", {"skipped": f"torch has no varlen_attn: {error}"})
    put("flash_attn importable", importlib.util.find_spec("flash_attn") is not None)

    def peaks() -> dict:
        half_flops, bandwidth = bench_gpu.measure_peaks(check.device, check.half, check.sizes.peak_size)
        values = {"half_tflops": half_flops / 1e12, "bandwidth_gbs": bandwidth / 1e9}
        for tf32 in (True, False):
            set_tf32(tf32)
            flops, _ = bench_gpu.measure_peaks(check.device, torch.float32, check.sizes.peak_size)
            values[f"float32_tf32_{'on' if tf32 else 'off'}_tflops"] = flops / 1e12
        set_tf32(True)
        return values

    check.item("env", "peaks", peaks)
    check.peaks = check.results.data["env"]["peaks"]

    def backends() -> dict:
        model = G2VLMForConditionalGeneration._from_config(G2VLMConfig(**profile_stages.TINY), dtype=check.half)
        model = model.to(check.device)
        check.default_attention = model.config._attn_implementation
        accepted = {"default": check.default_attention}
        for name in BACKENDS:
            try:
                model.set_attn_implementation(name)
                accepted[name] = model.config._attn_implementation
            except Exception as error:
                accepted[name] = {"refused": f"{type(error).__name__}: {str(error).strip()[:160]}"}
        return accepted

    check.item("env", "attention implementations (accepted -> resolved)", backends)


def section_tiny(check: Check) -> None:
    """The tiny config: the same weights on the CPU (eager, the reference) and on the device, float32, TF32 off."""
    set_tf32(False)
    config = G2VLMConfig(**profile_stages.TINY)
    torch.manual_seed(0)
    cpu = G2VLMForConditionalGeneration(config).eval()
    cpu.set_attn_implementation("eager")
    chat, recon = prompt_inputs(config, 2, 56, 56, "cpu", seed=1)
    generate = dict(max_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        ref_logits = cpu(**chat).logits
        ref_points = cpu.reconstruct(**recon).world_points
        ref_tokens = cpu.generate(**chat, **generate)

    def compare(name: str) -> dict:
        model = copy.deepcopy(cpu).to(check.device)
        resolved = check.select(model, name, torch.float32) if name != "default" else model.config._attn_implementation
        device_chat = {k: v.to(check.device) for k, v in chat.items()}
        device_recon = {k: v.to(check.device) for k, v in recon.items()}
        with torch.inference_mode():
            logits = model(**device_chat).logits
            points = model.reconstruct(**device_recon).world_points
            tokens = model.generate(**device_chat, **generate)
        return {
            "resolved": resolved,
            "logits_max_abs_diff": float((logits.cpu() - ref_logits).abs().max()),
            "world_points_max_abs_diff": float((points.cpu() - ref_points).abs().max()),
            "greedy_tokens_equal": bool(torch.equal(tokens.cpu(), ref_tokens)),
        }

    for name in ("eager", "sdpa", "flex_attention"):
        check.item("tiny", f"{name} float32", lambda name=name: compare(name), needs=5)
    set_tf32(True)


def section_agree(check: Check) -> None:
    """Every backend against eager float32 on the device (TF32 off), full size, random weights."""
    set_tf32(False)
    sizes = check.sizes
    model = check.build(torch.float32, "eager")
    chat, recon = prompt_inputs(check.config, 2, sizes.side, sizes.image_side, check.device)
    keep = 64

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            logits = model(**chat, logits_to_keep=keep).logits.float()
            points = model.reconstruct(**recon).world_points.float()
        return logits, points

    seconds, (ref_logits, ref_points) = check.timed(outputs)
    finite = bool(torch.isfinite(ref_logits).all() and torch.isfinite(ref_points).all())
    check.results.put("agree", "eager float32 (reference)", {"finite": finite, "seconds": seconds,
        "tokens": {"chat": chat["input_ids"].shape[1], "reconstruction": recon["input_ids"].shape[1]}})  # fmt: skip

    def against_reference(name: str, dtype: torch.dtype) -> dict:
        resolved = check.select(model, name, dtype)
        seconds, (logits, points) = check.timed(outputs)
        return {"resolved": resolved, "logits_rel": rel(logits, ref_logits), "world_points_rel": rel(points, ref_points),
                "seconds (first call)": seconds}  # fmt: skip

    for name in BACKENDS[1:]:
        check.item("agree", f"float32 {name}", lambda name=name: against_reference(name, torch.float32), needs=10)
    model.to(torch.bfloat16)
    model.geometry_heads.float()
    for name in BACKENDS:
        check.item("agree", f"bfloat16 {name}", lambda name=name: against_reference(name, torch.bfloat16), needs=10)
    set_tf32(True)


def section_stages(check: Check) -> None:
    """Each stage of a reconstruction (and of a chat prefill) beside its floor, TF32 on and off."""
    model = check.shared_model()
    sizes = check.sizes
    precision = StagePrecision.float32() if check.tiny else StagePrecision()
    for tf32 in (True, False):
        label = f"TF32 {'on' if tf32 else 'off'}"

        def run(tf32=tf32) -> dict:
            set_tf32(tf32)
            peaks, bandwidth = peaks_for(check, tf32)
            rows = profile_stages.profile_reconstruction(model, check.config, check.device, sizes.views, sizes.side,
                                                         sizes.side, 3, peaks, bandwidth, precision)  # fmt: skip
            return {row["stage"]: {k: v for k, v in row.items() if k != "stage"} for row in rows}

        check.item("stages", f"reconstruction, {sizes.views} views {sizes.side}x{sizes.side}, {label}", run, needs=8)

    def operators() -> dict:
        set_tf32(True)
        scene = [torch.randn(3, sizes.side, sizes.side) for _ in range(sizes.views)]
        inputs = bench_gpu.PromptProcessor(check.config)(scene).to(check.device)
        return trunk_ops.trunk_ops(model, inputs, check.device)

    check.item("stages", f"trunk by operator, {sizes.views} views {sizes.side}x{sizes.side}", operators, needs=5)

    def kernels() -> dict:
        peaks, _ = peaks_for(check, True)
        return attention_kernels.attention_kernels(check.config, check.device, check.half, sizes.views, sizes.side,
                                                   sizes.side, peaks["half"])  # fmt: skip

    check.item(
        "stages", f"attention kernels, the block of {sizes.views} views {sizes.side}x{sizes.side}", kernels, needs=5
    )

    def chat() -> dict:
        set_tf32(True)
        peaks, bandwidth = peaks_for(check, True)
        rows = profile_stages.profile_chat(model, check.config, check.device, 2, sizes.side, sizes.side,
                                           sizes.stage_image_side, 3, peaks, bandwidth, precision)  # fmt: skip
        return {row["stage"]: {k: v for k, v in row.items() if k != "stage"} for row in rows}

    check.item(
        "stages",
        f"chat prefill, 2 views {sizes.side}x{sizes.side} + one {sizes.stage_image_side}px image, TF32 on",
        chat,
        needs=5,
    )
    set_tf32(True)


def peaks_for(check: Check, tf32: bool) -> tuple[dict[str, float], float]:
    """The env section's measured peaks as costs.py's floors take them (FLOP/s per arithmetic, bytes/s)."""
    peaks = getattr(check, "peaks", None)
    if not isinstance(peaks, dict) or "half_tflops" not in peaks:
        half, bandwidth = bench_gpu.measure_peaks(check.device, check.half, check.sizes.peak_size)
        single, _ = bench_gpu.measure_peaks(check.device, torch.float32, check.sizes.peak_size)
        peaks = {"half_tflops": half / 1e12, "bandwidth_gbs": bandwidth / 1e9,
                 "float32_tf32_on_tflops": single / 1e12, "float32_tf32_off_tflops": single / 1e12}  # fmt: skip
        check.peaks = peaks
    single = peaks[f"float32_tf32_{'on' if tf32 else 'off'}_tflops"] * 1e12
    return {"half": peaks["half_tflops"] * 1e12, "float32": single}, peaks["bandwidth_gbs"] * 1e9


def floors(check: Check, views: int, height: int, width: int, tf32: bool = True, flops: float | None = None) -> dict:
    """The issue's floor (all FLOPs at the half-precision peak) and the stage floor (heads at the float32 rate)."""
    peaks, bandwidth = peaks_for(check, tf32)
    precision = StagePrecision.float32() if check.tiny else StagePrecision()
    flops = reconstruction_flops(check.config, views, height, width) if flops is None else flops
    return {"floor_s": flops / peaks["half"],
            "stage_floor_s": reconstruction_floor(check.config, views, height, width, peaks, bandwidth, precision=precision)}  # fmt: skip


def section_bench(check: Check) -> None:
    """bench_gpu.py's reconstruction rows for sdpa, torch_varlen and flex_attention."""
    model = check.shared_model()
    sizes, config, device = check.sizes, check.config, check.device
    inputs = bench_gpu.reconstruction_inputs(config, sizes.views, sizes.side, device)
    views_row = f"reconstruction, {sizes.views} views {sizes.side}x{sizes.side}"

    def reconstruction(name: str, tf32: bool, repeats: int = 3) -> dict:
        resolved = check.select(model, name, check.half)
        set_tf32(tf32)
        check.reset_peak()
        with torch.inference_mode():
            seconds = bench_gpu.best_time(lambda: model.reconstruct(**inputs), device, repeats)
        row = {"resolved": resolved, "seconds": seconds, "peak_gib": check.peak_gib()}
        row.update(floors(check, sizes.views, sizes.side, sizes.side, tf32))
        row["x_floor"] = seconds / row["floor_s"]
        return row

    for name in ("sdpa", "torch_varlen"):
        for tf32 in (True, False):
            check.item("bench", f"{name} | {views_row}, TF32 {'on' if tf32 else 'off'}",
                       lambda name=name, tf32=tf32: reconstruction(name, tf32), needs=8)  # fmt: skip

    def compiled_layers() -> dict:
        """The default attention with each decoder layer and each head block compiled by inductor ("regional
        compilation": the 28 layers share one graph, the head blocks one per kind): what fusing the element-wise work
        (norms, RoPE, SwiGLU, routing; the heads' 2D RoPE, LayerNorms and GELU) gives, per stage."""
        if check.tiny and not check.tiny_flex:
            raise Skip(
                "--tiny leaves the compiled rows out (on the CPU inductor compiles C++, ~30 s); --tiny-flex adds them"
            )
        from g2vlm_hf.modeling.head_layers import G2VLMHeadBlock, G2VLMHeadCrossBlock

        resolved = check.select(model, check.default_attention, check.half)
        blocks = [*model.model.language_model.layers]
        blocks += [module for module in model.geometry_heads.modules() if isinstance(module, (G2VLMHeadBlock, G2VLMHeadCrossBlock))]  # fmt: skip
        scene = [torch.randn(3, sizes.side, sizes.side) for _ in range(sizes.views)]
        prompt = bench_gpu.PromptProcessor(config)(scene).to(device)  # the shapes profile_reconstruction times
        torch._dynamo.reset()
        set_tf32(True)
        peaks, bandwidth = peaks_for(check, True)
        precision = StagePrecision.float32() if check.tiny else StagePrecision()
        try:
            for block in blocks:
                block.compile()
            check.reset_peak()
            with torch.inference_mode(), CompileWatch() as watch:
                first, _ = check.timed(lambda: model.reconstruct(**prompt))
                rows = profile_stages.profile_reconstruction(model, config, device, sizes.views, sizes.side, sizes.side,
                                                             3, peaks, bandwidth, precision)  # fmt: skip
        finally:
            for block in blocks:
                block._compiled_call_impl = None  # back to eager for the rows after this one
        stages = {row["stage"]: row for row in rows}
        row = {"resolved": resolved, "seconds": stages["total"]["seconds"], "first_call_s": first,
               "peak_gib": check.peak_gib(), "compile": watch.stats(),
               "stages": {name: {"seconds": stage["seconds"], "over_floor": stage.get("over_floor")}
                          for name, stage in stages.items()}}  # fmt: skip
        row.update(floors(check, sizes.views, sizes.side, sizes.side))
        row["x_floor"] = row["seconds"] / row["floor_s"]
        return row

    # flex attention: in a fresh compile state (as in a new process), then after a dozen other prompt shapes
    def flex_fresh() -> dict:
        resolved = check.select(model, "flex_attention", check.half)
        torch._dynamo.reset()
        set_tf32(True)
        check.reset_peak()
        with torch.inference_mode():
            first, _ = check.timed(lambda: model.reconstruct(**inputs))
            seconds = bench_gpu.best_time(lambda: model.reconstruct(**inputs), device, 3)
        row = {"resolved": resolved, "seconds": seconds, "first_call_s": first, "peak_gib": check.peak_gib()}
        row.update(floors(check, sizes.views, sizes.side, sizes.side))
        row["x_floor"] = seconds / row["floor_s"]
        return row

    fresh = check.item("bench", f"flex_attention (fresh) | {views_row}, TF32 on", flex_fresh, needs=40)

    def mixed_shapes() -> dict:
        check.select(model, "flex_attention", check.half)
        stop = time.monotonic() + min(60.0, check.left() / 3)
        ran = []
        with torch.inference_mode():
            for views, side in sizes.mixed_shapes:
                if time.monotonic() > stop:
                    break
                model.reconstruct(**bench_gpu.reconstruction_inputs(config, views, side, device))
                ran.append(f"{views}x{side}")
        from torch._dynamo.utils import counters

        return {"shapes": ran, "dynamo_stats": dict(counters.get("stats", {})), "dynamo_frames": dict(counters.get("frames", {})),
                "graph_breaks": sum(counters.get("graph_break", {}).values())}  # fmt: skip

    check.item("bench", "flex_attention | other prompt shapes first", mixed_shapes, needs=20)

    def flex_after() -> dict:
        row = reconstruction("flex_attention", True)
        if isinstance(fresh, dict) and fresh.get("seconds"):
            row["over_fresh"] = row["seconds"] / fresh["seconds"]
        return row

    check.item("bench", f"flex_attention (after other shapes) | {views_row}, TF32 on", flex_after, needs=10)
    check.item("bench", f"flex_attention | {views_row}, TF32 off",
               lambda: reconstruction("flex_attention", False), needs=8)  # fmt: skip
    set_tf32(True)

    processor = bench_gpu.PromptProcessor(config)
    width, height = sizes.frame_width, sizes.frame_height

    def frames_row(name: str, frames: int, chunked: bool, needs: float) -> None:
        def run() -> dict:
            resolved = check.select(model, name, check.half)
            views = [torch.randn(3, height, width) for _ in range(frames)]  # made on the host, as read from a video
            if chunked:
                call = lambda: reconstruct_chunked(model, processor, views, sizes.chunk_size, sizes.overlap)
                chunks = [len(chunk) for chunk, _ in plan_chunks(range(frames), sizes.chunk_size, sizes.overlap)]
                flops = sum(reconstruction_flops(config, size, height, width) for size in chunks)
                stage_floor = sum(floors(check, size, height, width)["stage_floor_s"] for size in chunks)
            else:
                call = lambda: model.reconstruct(**processor(views).to(device))
                flops, stage_floor = None, None
            check.reset_peak()
            with torch.inference_mode():
                seconds, _ = check.timed(call)
            row = {"resolved": resolved, "seconds (one call, kernels warm)": seconds, "peak_gib": check.peak_gib()}
            row.update(floors(check, frames, height, width, flops=flops))
            if stage_floor is not None:
                row["stage_floor_s"] = stage_floor
            row["x_floor"] = seconds / row["floor_s"]
            return row

        mode = f"chunks of {sizes.chunk_size}/{sizes.overlap}" if chunked else "one pass"
        check.item("bench", f"{name} | {frames} frames {width}x{height}, {mode}", run, needs=needs)

    for name, needs in (("torch_varlen", 10), ("sdpa", 15), ("flex_attention", 25)):
        frames_row(name, sizes.one_pass_frames, False, needs)
    for name, needs in (("torch_varlen", 15), ("sdpa", 20), ("flex_attention", 25)):
        frames_row(name, sizes.chunked_frames, True, needs)
    # exploratory, so last: it gets the time the issue's rows leave
    check.item(
        "bench", f"default, decoder layers and head blocks compiled | {views_row}, TF32 on", compiled_layers, needs=60
    )
    model.set_attn_implementation(check.default_attention)


class CompileWatch(logging.Handler):
    """What compiling gave over one `with` block (the decode step, the compiled decoder layers): dynamo's graphs and
    graph breaks, and inductor's CUDA-graph skips with their reasons (a step split into graphs, or one without CUDA
    graphs, runs far from its floor)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.skip_reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "skipping cudagraphs" in record.getMessage():
            self.skip_reasons.append(record.getMessage()[:300])

    def __enter__(self) -> CompileWatch:
        from torch._dynamo.utils import counters

        counters.clear()
        torch._logging.set_logs(cudagraphs=True)
        logging.getLogger("torch").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("torch").removeHandler(self)
        torch._logging.set_logs()

    def stats(self) -> dict:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                "cudagraph_skip_reasons": sorted(set(self.skip_reasons))}  # fmt: skip


def section_decode(check: Check) -> None:
    """tok/s from a time stamp after every generated token (`generate` with a stopping criterion that syncs), and
    what compiling the step gave (`CompileWatch`)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = check.shared_model()
    model.set_attn_implementation(check.default_attention)
    config, sizes = check.config, check.sizes

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            check.sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    plain = bench_gpu.plain_text_ids(config)
    for batch in (1, 8):
        # the calls grow like the turns of a chat: a longer prompt gets a longer static cache, which must not compile
        # the step again (the attempts' call_s and the row's graphs say whether it did)
        prompts = [
            torch.randint(3, plain, (batch, sizes.context + 32 * turn), device=check.device) for turn in range(3)
        ]
        floor = (
            batch
            * peaks_for(check, True)[1]
            / decode_bytes_per_token(config, sizes.context, batch, 2 if not check.tiny else 4)
        )
        for mode, kwargs in (("default settings", {}), ("static cache", {"cache_implementation": "static"})):

            def run(kwargs=kwargs, prompts=prompts, batch=batch, floor=floor) -> dict:
                attempts = []
                with torch.inference_mode(), CompileWatch() as watch:
                    for ids in prompts:  # the first call compiles where generate compiles the step
                        stamps = Stamps()
                        start = time.perf_counter()
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sizes.new_tokens,
                                       min_new_tokens=sizes.new_tokens, do_sample=False,
                                       stopping_criteria=StoppingCriteriaList([stamps]), **kwargs)  # fmt: skip
                        steps = stamps.times
                        attempts.append({"call_s": time.perf_counter() - start, "first_token_s": steps[0] - start,
                                         "tok_per_s": batch * (len(steps) - 1) / (steps[-1] - steps[0])})  # fmt: skip
                        if check.left() < 2 * attempts[-1]["call_s"]:
                            break
                best = max(attempt["tok_per_s"] for attempt in attempts[1:] or attempts)
                return {"tok_per_s": best, "floor_tok_per_s": floor, "of_floor": best / floor,
                        "prefill_tok_per_s": batch * sizes.context / min(a["first_token_s"] for a in attempts),
                        "compile": watch.stats(), "attempts": attempts}  # fmt: skip

            check.item("decode", f"batch {batch}, {mode}, after {sizes.context} tokens", run, needs=15)

    def step_parts() -> dict:
        ids = torch.randint(3, plain, (1, sizes.context), device=check.device)
        return decode_steps.decode_steps(model, ids, sizes.new_tokens)

    check.item("decode", "batch 1, default settings, one step by parts (decode_steps.py)", step_parts, needs=10)


def section_lora(check: Check) -> None:
    """One LoRA step (adapters on the semantic expert's attention) under bf16 autocast."""
    from peft import LoraConfig, get_peft_model

    def step() -> dict:
        model = check.shared_model()
        model.set_attn_implementation(check.default_attention)
        check._model = None  # PEFT changes the model in place: no later section may reuse it
        model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        chat, _ = prompt_inputs(check.config, 2, check.sizes.lora_side, check.sizes.lora_side, check.device)
        labels = chat["input_ids"].clone()
        model.train()
        check.reset_peak()
        start = time.perf_counter()
        with torch.autocast(check.device.type, dtype=torch.bfloat16):
            loss = model(**chat, labels=labels).loss
        loss.backward()
        check.sync()
        seconds = time.perf_counter() - start
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        return {
            "loss": float(loss.detach()), "loss_finite": bool(torch.isfinite(loss.detach())),
            "grads_finite": all(g is None or bool(torch.isfinite(g).all()) for g in grads),
            "adapter_tensors": len(grads), "with_nonzero_grad": sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads),
            "seconds": seconds, "peak_gib": check.peak_gib(),
        }  # fmt: skip

    check.item("lora", "step, bf16 autocast", step, needs=5)


# --- the table -------------------------------------------------------------------------------------------------------
def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def stage_summary(stages: dict) -> str:
    """`stage ms (x floor)` for each timed stage of a profile_stages record."""
    return ", ".join(
        f"{stage} {fmt(row['seconds'] * 1e3)} ms"
        + (f" ({fmt(row['over_floor'], 2)}x)" if row.get("over_floor") else "")
        for stage, row in stages.items()
        if row.get("seconds") is not None
    )


def table(data: dict) -> str:
    """A short summary of `data` (the JSON), one line per measurement."""
    lines = []

    def status(value) -> str | None:
        if isinstance(value, dict) and ("skipped" in value or "failed" in value):
            return f"{'skipped' if 'skipped' in value else 'FAILED'}: {value.get('skipped') or value.get('failed')}"[
                :110
            ]
        return None

    env = data.get("env", {})
    versions, gpu, peaks = env.get("versions", {}), env.get("gpu", {}), env.get("peaks", {})
    lines.append(f"env: {gpu.get('name', 'CPU')}; torch {versions.get('torch')}, transformers {versions.get('transformers')}, "
                 f"flash_attn {env.get('flash_attn importable')}; attention {env.get('attention implementations (accepted -> resolved)')}")  # fmt: skip
    if isinstance(peaks, dict) and "half_tflops" in peaks:
        lines.append(f"peaks: {fmt(peaks['half_tflops'])} TFLOP/s half, float32 {fmt(peaks['float32_tf32_on_tflops'])} "
                     f"(TF32) / {fmt(peaks['float32_tf32_off_tflops'])}, {fmt(peaks['bandwidth_gbs'])} GB/s")  # fmt: skip
    for key, value in data.get("tiny", {}).items():
        lines.append(f"tiny   {key:<32} " + (status(value) or f"logits {fmt(value['logits_max_abs_diff'])}  points "
                     f"{fmt(value['world_points_max_abs_diff'])}  tokens equal {value['greedy_tokens_equal']}"))  # fmt: skip
    for key, value in data.get("agree", {}).items():
        if "reference" in key:
            lines.append(
                f"agree  {key:<32} " + (status(value) or f"finite {value['finite']}, tokens {value['tokens']}")
            )
        else:
            lines.append(f"agree  {key:<32} " + (status(value) or f"logits rel {fmt(value['logits_rel'])}  points rel "
                         f"{fmt(value['world_points_rel'])}  ({value['resolved']})"))  # fmt: skip
    for key, value in data.get("stages", {}).items():
        if status(value):
            lines.append(f"stages {key}: {status(value)}")
            continue
        if "shape" in value:
            lines.extend(f"stages {line}" for line in attention_kernels.format_rows(value).splitlines())
            continue
        if "by_kind_ms" in value:
            kinds = ", ".join(f"{kind} {fmt(ms)}" for kind, ms in value["by_kind_ms"].items())
            lines.append(f"stages {key}: {fmt(value['wall_ms'])} ms, {kinds}; idle {fmt(value['idle_ms'])} ms, "
                         f"{value['kernels']} kernels")  # fmt: skip
            continue
        lines.append(f"stages {key}: " + stage_summary(value))
    lines.append(f"{'bench':<6} {'row':<72} {'s':>8} {'floor':>7} {'x':>5} {'stagefl':>7} {'GiB':>6}")
    for key, value in data.get("bench", {}).items():
        if status(value) or ("seconds" not in value and "seconds (one call, kernels warm)" not in value):
            lines.append(f"bench  {key:<72} " + (status(value) or json.dumps(value)[:100]))
            continue
        seconds = value.get("seconds", value.get("seconds (one call, kernels warm)"))
        extra = f"  {fmt(value['over_fresh'], 2)}x fresh" if "over_fresh" in value else ""
        extra += f"  first call {fmt(value['first_call_s'])} s" if "first_call_s" in value else ""
        lines.append(f"bench  {key:<72} {fmt(seconds):>8} {fmt(value['floor_s']):>7} {fmt(value['x_floor'], 2):>5} "
                     f"{fmt(value['stage_floor_s']):>7} {fmt(value['peak_gib']):>6}{extra}")  # fmt: skip
        if "stages" in value:
            lines.append("bench    per stage: " + stage_summary(value["stages"]))
    for key, value in data.get("decode", {}).items():
        if isinstance(value, dict) and "wall_ms" in value:
            lines.append(f"decode {key:<50} " + (status(value) or decode_steps.format_steps(value)))
            continue
        compiled = value.get("compile", {}) if isinstance(value, dict) else {}
        lines.append(f"decode {key:<50} " + (status(value) or f"{fmt(value['tok_per_s'], 4)} tok/s (floor "
                     f"{fmt(value['floor_tok_per_s'], 4)}), prefill {fmt(value['prefill_tok_per_s'], 4)} tok/s, "
                     f"{compiled.get('graphs')} graphs, {compiled.get('graph_breaks')} breaks, "
                     f"{compiled.get('cudagraph_skips')} CUDA-graph skips"))  # fmt: skip
    for key, value in data.get("lora", {}).items():
        lines.append(f"lora   {key:<32} " + (status(value) or f"loss {fmt(value['loss'])} finite {value['loss_finite']}, grads "
                     f"finite {value['grads_finite']}, {value['with_nonzero_grad']}/{value['adapter_tensors']} non-zero, "
                     f"{fmt(value['seconds'])} s, {fmt(value['peak_gib'])} GiB"))  # fmt: skip
    lines.append(f"section seconds: {data.get('time', {})}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder of gpu_check.json")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all sections together")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run of every section with the tiny config")
    parser.add_argument(
        "--tiny-flex",
        action="store_true",
        help="with --tiny: include flex_attention and the compiled decoder layers and head blocks (minutes)",
    )
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or pass --tiny for a CPU dry run")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args)
    check.results.put("meta", "run", {"budget_s": args.budget, "tiny": args.tiny, "sections": args.sections,
                                      "device": str(check.device), "half": str(check.half)})  # fmt: skip

    def out_of_time() -> None:  # the last resort: a section stuck past the whole budget still leaves the table
        print(f"\nThe budget of {args.budget:.0f} s (+30 s) is spent; the table of what was measured:", flush=True)
        print(table(check.results.data), flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.budget + 30.0, out_of_time)
    watchdog.daemon = True
    watchdog.start()
    planned = 0.0
    for name in args.sections:
        planned += SHARES[name] * check.scale
        check.deadline = min(check.end, check.start + planned)
        started = time.monotonic()
        if check.end - started < 5:
            check.results.put(name, "section", {"skipped": "the whole budget is spent"})
            continue
        try:
            globals()[f"section_{name}"](check)
        except Exception as error:  # a broken section leaves the others running
            traceback.print_exc()
            check.results.put(name, "section", {"failed": f"{type(error).__name__}: {str(error).strip()[:400]}"})
        check.results.put("time", name, time.monotonic() - started)
        check.empty()
    watchdog.cancel()
    watchdog.join()  # its closure holds the models: released here, not by a thread at interpreter exit (an abort)
    print("\n" + table(check.results.data), flush=True)
    return check.results.data


if __name__ == "__main__":
    main()
