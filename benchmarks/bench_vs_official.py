"""CPU benchmark of the port against the official implementation on the same weights, in one run.

Both sides load one official-layout checkpoint (the port after conversion): by default the tiny fixture of
../shared/fixtures/official-tiny, or a full-size one with random weights from benchmarks/make_random_official.py.
Both see the same view images (the synthetic room at 518x392). Measured: reconstruction latency (preprocessing
included) for 2/8/16 views and decode tokens/s at batch 1, and for the port prefill and decode at batch 1 and 8 with
1k and 4k tokens of context, each with its analytic FLOP or byte count and the floor it implies on this machine.
The official side runs in the harness environment (../shared/tools/official-harness: a venv with torch 2.14.1,
torchvision and transformers 4.49) with the harness's CPU stand-in for flash_attn, in float32.

    python benchmarks/bench_vs_official.py --official-python /path/to/harness-venv/bin/python \
        --ref-dir /path/to/official/tree [--views 2 8 16] [--decode-steps 32] [--threads 2]
    python benchmarks/make_random_official.py /tmp/g2vlm-2b-official     # full size: 9 GB, then
    python benchmarks/bench_vs_official.py ... --checkpoint /tmp/g2vlm-2b-official --views 2 --decode-steps 8 \
        --repeats 1 --no-long-context

Without --official-python only the port is measured. Prints a table; never a test.
"""

import argparse
import gc
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from costs import decode_bytes_per_token, decoder_flops, measure_peaks, reconstruction_flops
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, CompileConfig
from transformers.generation.streamers import BaseStreamer

import g2vlm_hf  # noqa: F401
from g2vlm_hf.conversion import convert_official_checkpoint
from g2vlm_hf.training import render_room, yaw_pose

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-tiny" / "checkpoint"
SHIM = ROOT.parent / "shared" / "tools" / "official-harness" / "shim"
HEIGHT, WIDTH = 392, 518


def write_views(folder: Path, count: int) -> list[str]:
    poses = np.stack([yaw_pose(0.15 * i - 1.0, 0.05 * i, 2.0 * i - 15) for i in range(count)])
    paths = []
    for index, image in enumerate(render_room(poses, HEIGHT, WIDTH).images):
        path = folder / f"view_{index:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


class TokenClock(BaseStreamer):
    """Records when each generated token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rate(model, inputs: dict, steps: int, repeats: int, **generate_kwargs) -> float:
    """Best decode tokens/s over `repeats` runs, from the arrival times of the generated tokens (prefill excluded)."""
    rates = []
    for _ in range(repeats):
        clock = TokenClock()
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, streamer=clock, **generate_kwargs)
        rates.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
    return max(rates)


def prefill_rates(model, repeats: int) -> dict[tuple[int, int], float]:
    """Prefill tokens/s of text prompts at batch 1 and 8 with 1k and 4k tokens of context."""
    rates = {}
    vocab = model.config.text_config.vocab_size
    for batch in (1, 8):
        for context in (1024, 4096):
            ids = torch.randint(0, vocab - 10, (batch, context), generator=torch.Generator().manual_seed(0))
            seconds = best_of(lambda ids=ids: model(input_ids=ids, logits_to_keep=1), repeats)
            rates[(batch, context)] = batch * context / seconds
    return rates


def long_context_decode_rates(model, steps: int, repeats: int) -> dict[tuple[int, int], float]:
    """Decode tokens/s (all sequences together) after text prompts of 1k and 4k tokens at batch 1 and 8."""
    rates = {}
    vocab = model.config.text_config.vocab_size
    for batch in (1, 8):
        for context in (1024, 4096):
            ids = torch.randint(0, vocab - 10, (batch, context), generator=torch.Generator().manual_seed(0))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            rates[(batch, context)] = batch * decode_rate(model, inputs, steps, repeats)
    return rates


def port_results(model_dir: Path, cases: list[list[str]], decode_steps: int, repeats: int, long_context: bool) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    results = {"recon": []}
    with torch.inference_mode():
        for paths in cases:
            seconds = best_of(lambda paths=paths: model.reconstruct(**processor(geometry_images=paths, return_tensors="pt")), repeats)
            results["recon"].append({"views": len(paths), "seconds": seconds})
        messages = [{"role": "user", "content": [{"type": "image", "image": cases[0][0]}, {"type": "text", "text": "How far is the red box?"}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")

        results["decode"] = decode_rate(model, inputs, decode_steps, repeats)
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # transformers only auto-compiles on accelerators by default
        results["decode_compiled"] = decode_rate(
            model, inputs, decode_steps, repeats + 1, cache_implementation="static", compile_config=compile_config
        )
        if long_context:
            results["prefill"] = prefill_rates(model, repeats)
            results["long_decode"] = long_context_decode_rates(model, decode_steps, repeats)
    results["context"] = inputs["input_ids"].shape[1]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-python", help="python of the official harness environment")
    parser.add_argument("--ref-dir", help="the official source tree (git archive of InternRobotics/G2VLM)")
    parser.add_argument("--checkpoint", type=Path, default=FIXTURE, help="official-layout checkpoint folder "
                        "(default: the tiny fixture; benchmarks/make_random_official.py writes a full-size one)")
    parser.add_argument("--views", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--long-context", action=argparse.BooleanOptionalAction, default=True,
                        help="also prefill and decode at batch 1 and 8 with 1k and 4k tokens of context")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir = convert_official_checkpoint(args.checkpoint, scratch / "converted")
        all_views = write_views(scratch, max(args.views))
        cases = [all_views[:count] for count in args.views]
        config = AutoConfig.from_pretrained(model_dir)
        port = port_results(model_dir, cases, args.decode_steps, args.repeats, args.long_context)
        # free the port's model before the official side loads its own copy (at full size both do not fit at once):
        # the compiled decode step keeps references to it until dynamo's caches are dropped
        torch._dynamo.reset()
        gc.collect()
        official = None
        if args.official_python:
            command = [
                args.official_python, str(ROOT / "benchmarks" / "official_runner.py"), "--ref-dir", args.ref_dir,
                "--shim", str(SHIM), "--checkpoint", str(args.checkpoint), "--views", json.dumps(cases),
                "--decode-steps", str(args.decode_steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
            ]  # fmt: skip
            official = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    peak_flops, peak_bandwidth = measure_peaks()
    print(f"CPU, {args.threads} threads, float32; measured peaks: {peak_flops / 1e9:.1f} GFLOP/s matmul, {peak_bandwidth / 1e9:.1f} GB/s copy")
    print(f"{'benchmark':<28}{'port':>12}{'official':>12}{'speed-up':>10}{'floor':>12}{'port/floor':>12}")
    for index, case in enumerate(port["recon"]):
        flops = reconstruction_flops(config, case["views"], HEIGHT, WIDTH)
        floor = flops / peak_flops
        official_s = official["recon"][index]["seconds"] if official else float("nan")
        print(f"{'recon ' + str(case['views']) + ' views (s)':<28}{case['seconds']:>12.3f}{official_s:>12.3f}"
              f"{official_s / case['seconds']:>10.2f}{floor:>12.4f}{case['seconds'] / floor:>12.1f}")  # fmt: skip
    floor = decode_bytes_per_token(config, port["context"]) / peak_bandwidth
    official_rate = official["decode"]["tokens_per_second"] if official else float("nan")
    for name, rate in (("decode b1 (tok/s)", port["decode"]), ("decode b1 static+compile", port["decode_compiled"])):
        print(f"{name:<28}{rate:>12.1f}{official_rate:>12.1f}{rate / official_rate:>10.2f}{1 / floor:>12.1f}"
              f"{(1 / floor) / rate:>12.1f}")  # fmt: skip
    for (batch, context), rate in port.get("prefill", {}).items():
        floor_rate = peak_flops / (decoder_flops(config, context) / context)
        label = f"prefill b{batch} {context // 1024}k (tok/s)"
        print(f"{label:<28}{rate:>12.0f}{'-':>12}{'-':>10}{floor_rate:>12.0f}{floor_rate / rate:>12.1f}")
    for (batch, context), rate in port.get("long_decode", {}).items():
        floor_rate = batch * peak_bandwidth / decode_bytes_per_token(config, context, batch)
        label = f"decode b{batch} {context // 1024}k (tok/s)"
        print(f"{label:<28}{rate:>12.0f}{'-':>12}{'-':>10}{floor_rate:>12.0f}{floor_rate / rate:>12.1f}")
    print(f"(floors: recon and prefill analytic FLOPs / peak FLOP/s; decode weights + KV bytes per token / bandwidth; "
          f"decode context {port['context']} tokens; 'port/floor' = how many times the floor the port takes)")


if __name__ == "__main__":
    main()
