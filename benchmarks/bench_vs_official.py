"""CPU benchmark of the port against the official implementation on the same weights, in one run.

Both sides load one official-layout checkpoint (the port after conversion): by default the tiny fixture of
../shared/fixtures/official-tiny, or a full-size one with random weights from benchmarks/make_random_official.py.
Both see the same view images (the synthetic room at 518x392). Measured: reconstruction latency (preprocessing
included) for 2/8/16 views and decode tokens/s at batch 1, and for the port prefill and decode at batch 1 and 8 with
1k and 4k tokens of context, each with its analytic FLOP or byte count and the floor it implies on this machine.
The official side runs in the harness environment
(../shared/tools/official-harness: a venv with torch 2.14.1, torchvision and transformers 4.49) with the harness's CPU
stand-in for flash_attn, in float32; it also records its inputs and outputs of the first reconstruction and of the
chat, and the port, run on those very inputs, prints its relative error on the world points and on the first decode
logits. With --before-src, an older checkout's `src` folder is timed too (each port side in its own process).

    python benchmarks/bench_vs_official.py --official-python /path/to/harness-venv/bin/python \
        --ref-dir /path/to/official/tree [--before-src /path/to/old/checkout/src] [--views 2 8 16] \
        [--decode-steps 32] [--threads 2]
    python benchmarks/make_random_official.py /tmp/g2vlm-2b-official     # full size: 9 GB, then
    python benchmarks/bench_vs_official.py ... --checkpoint /tmp/g2vlm-2b-official --views 2 --decode-steps 8 \
        --repeats 1 --no-long-context

Without --official-python only the port is measured. Prints a table; never a test.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from costs import decode_bytes_per_token, decoder_flops, measure_peaks, reconstruction_flops
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    CompileConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
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
        model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, streamer=clock, **generate_kwargs
        )
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


def reference_decode_rate(config, context: int, spec: dict, repeats: int) -> float:
    """Decode tokens/s of transformers' own Qwen2-VL with the port's text decoder size (random weights, a text prompt
    of `context` tokens, dynamic cache): the per-token host work of `generate` on a transformers model, which the
    port's decode adds to only what its own forward costs more."""
    text = {key: value for key, value in config.text_config.to_dict().items() if key != "model_type"}
    text |= {"bos_token_id": None, "eos_token_id": None}  # Qwen2-VL's defaults lie outside a tiny vocabulary
    reference_config = Qwen2VLConfig(
        text_config=text,
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": text["hidden_size"], "num_heads": 2},
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
    )
    reference = Qwen2VLForConditionalGeneration._from_config(reference_config, dtype=torch.float32).eval()
    vocab = config.text_config.vocab_size
    ids = torch.randint(0, vocab - 10, (1, context), generator=torch.Generator().manual_seed(0))
    return decode_rate(
        reference, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, spec["decode_steps"], repeats
    )


def relative_error(port: torch.Tensor, official: torch.Tensor) -> float:
    return float((port.float() - official.float()).norm() / official.float().norm())


def parity_errors(model, record: Path) -> dict[str, float]:
    """The port run on the very inputs the official run recorded (token ids of each phase with our placeholders,
    geometry and semantic pixels): relative errors of the world points and of the first decode logits."""
    tensors = load_file(record)
    config = model.config

    def phase_ids(phase: str, media_key: str, placeholder: int) -> torch.Tensor:
        ids = torch.full((int(tensors[f"{phase}.packed_seqlens"].sum()),), -1, dtype=torch.long)
        ids[tensors[f"{phase}.packed_text_indexes"]] = tensors[f"{phase}.packed_text_ids"]
        ids[tensors[f"{phase}.{media_key}"]] = placeholder
        return ids

    geo, image = config.geometry_token_id, config.image_token_id
    recon_ids = torch.cat(
        [tensors["recon.phase0.packed_text_ids"], phase_ids("recon.phase1", "packed_dino_token_indexes", geo)]
    )
    world_points = model.reconstruct(
        input_ids=recon_ids[None], geometry_pixel_values=tensors["recon.phase1.packed_dino_images"][None]
    ).world_points
    chat_ids = torch.cat([
        tensors["chat.phase0.packed_text_ids"],
        phase_ids("chat.phase1", "packed_dino_token_indexes", geo),
        phase_ids("chat.phase2", "packed_vit_token_indexes", image),
        tensors["chat.phase3.packed_text_ids"],
        tensors["chat.start_tokens"],
    ])  # fmt: skip
    logits = model(
        input_ids=chat_ids[None],
        pixel_values=tensors["chat.phase2.packed_vit_images"][0],
        image_grid_thw=tensors["chat.phase2.packed_image_grid_thw"],
        geometry_pixel_values=tensors["chat.phase1.packed_dino_images"][None],
        logits_to_keep=1,
    ).logits[0, -1]
    return {
        "world_points": relative_error(world_points, tensors["recon.world_points"]),
        "first_logits": relative_error(logits, tensors["chat.first_logits"][0]),
    }


def port_results(spec: dict) -> dict:
    """Everything measured on the port, in this process (run as a child, see `measure_port`)."""
    torch.set_num_threads(spec["threads"])
    model_dir, cases, repeats = Path(spec["model_dir"]), spec["cases"], spec["repeats"]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    results = {"recon": []}
    with torch.inference_mode():
        for paths in cases:
            seconds = best_of(
                lambda paths=paths: model.reconstruct(**processor(geometry_images=paths, return_tensors="pt")), repeats
            )
            results["recon"].append({"views": len(paths), "seconds": seconds})
        if spec["record"]:
            results["parity"] = parity_errors(model, Path(spec["record"]))
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": cases[0][0]},
                    {"type": "text", "text": "How far is the red box?"},
                ],
            }
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )

        results["decode"] = decode_rate(model, inputs, spec["decode_steps"], repeats)
        results["decode_reference"] = reference_decode_rate(model.config, inputs["input_ids"].shape[1], spec, repeats)
        compile_config = CompileConfig(fullgraph=False, dynamic=False)
        compile_config._compile_all_devices = True  # transformers only auto-compiles on accelerators by default
        results["decode_compiled"] = decode_rate(
            model,
            inputs,
            spec["decode_steps"],
            repeats + 1,
            cache_implementation="static",
            compile_config=compile_config,
        )
        if spec["long_context"]:
            results["prefill"] = {f"{b} {c}": r for (b, c), r in prefill_rates(model, repeats).items()}
            results["long_decode"] = {
                f"{b} {c}": r for (b, c), r in long_context_decode_rates(model, spec["decode_steps"], repeats).items()
            }
    results["context"] = inputs["input_ids"].shape[1]
    return results


def measure_port(spec: dict, source: str | None = None) -> dict:
    """Run `port_results` in a child process, on the installed package or on the `source` folder (an older `src`)."""
    env = dict(os.environ)
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(source).resolve()), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--measure-port", json.dumps(spec)]
    # the child's stderr passes through: a failing side shows its traceback
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def print_table(config, port: dict, before: dict | None, official: dict | None, threads: int) -> None:
    nan = float("nan")
    peak_flops, peak_bandwidth = measure_peaks()
    print(
        f"CPU, {threads} threads, float32; measured peaks: {peak_flops / 1e9:.1f} GFLOP/s matmul, {peak_bandwidth / 1e9:.1f} GB/s copy"
    )
    print(f"{'benchmark':<30}{'before':>10}{'port':>10}{'official':>10}{'speed-up':>10}{'floor':>10}{'port/floor':>12}")

    def row(label, before_value, value, official_value, floor, fmt, faster_is_lower=True):
        speed_up = official_value / value if faster_is_lower else value / official_value
        ratio = value / floor if faster_is_lower else floor / value
        print(f"{label:<30}{before_value:>10{fmt}}{value:>10{fmt}}{official_value:>10{fmt}}{speed_up:>10.2f}"
              f"{floor:>10{fmt}}{ratio:>12.2f}")  # fmt: skip

    official_recon = {case["views"]: case["seconds"] for case in official["recon"]} if official else {}
    before_recon = {case["views"]: case["seconds"] for case in before["recon"]} if before else {}
    for case in port["recon"]:
        views = case["views"]
        floor = reconstruction_flops(config, views, HEIGHT, WIDTH) / peak_flops
        row(
            f"recon {views} views (s)",
            before_recon.get(views, nan),
            case["seconds"],
            official_recon.get(views, nan),
            floor,
            ".3f",
        )
    floor_rate = peak_bandwidth / decode_bytes_per_token(config, port["context"])
    official_rate = official["decode"]["tokens_per_second"] if official else nan
    for key, label in (
        ("decode", "decode b1 (tok/s)"),
        ("decode_compiled", "decode b1 static+compile"),
        ("decode_reference", "decode b1 Qwen2-VL (reference)"),
    ):
        row(label, before[key] if before else nan, port[key], official_rate, floor_rate, ".1f", faster_is_lower=False)
    for key, rate in port.get("prefill", {}).items():
        batch, context = map(int, key.split())
        floor_rate = peak_flops / (decoder_flops(config, context) / context)
        row(
            f"prefill b{batch} {context // 1024}k (tok/s)",
            before["prefill"][key] if before else nan,
            rate,
            nan,
            floor_rate,
            ".0f",
            False,
        )
    for key, rate in port.get("long_decode", {}).items():
        batch, context = map(int, key.split())
        floor_rate = batch * peak_bandwidth / decode_bytes_per_token(config, context, batch)
        row(
            f"decode b{batch} {context // 1024}k (tok/s)",
            before["long_decode"][key] if before else nan,
            rate,
            nan,
            floor_rate,
            ".0f",
            False,
        )
    print(f"(speed-up: port against official; floors: recon and prefill analytic FLOPs / peak FLOP/s, decode weights + "
          f"KV bytes per token / bandwidth; decode context {port['context']} tokens; 'port/floor': how many times the "
          "floor the port takes, or the floor's rate over the port's; 'Qwen2-VL (reference)': transformers' own "
          "Qwen2-VL with the same text decoder and context, measured in each port process: the host work of "
          "generate() itself)")  # fmt: skip
    if "parity" in port:
        parity = port["parity"]
        print(f"parity with the official run on its own inputs (float32): world points relative error "
              f"{parity['world_points']:.2e}, first decode logits relative error {parity['first_logits']:.2e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-python", help="python of the official harness environment")
    parser.add_argument("--ref-dir", help="the official source tree (git archive of InternRobotics/G2VLM)")
    parser.add_argument("--before-src", help="an older checkout's `src` folder, timed beside the current code")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=FIXTURE,
        help="official-layout checkpoint folder "
        "(default: the tiny fixture; benchmarks/make_random_official.py writes a full-size one)",
    )
    parser.add_argument("--views", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument(
        "--long-context",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also prefill and decode at batch 1 and 8 with 1k and 4k tokens of context",
    )
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--measure-port", help=argparse.SUPPRESS)  # internal: the child process of measure_port
    args = parser.parse_args()
    if args.measure_port:
        print(json.dumps(port_results(json.loads(args.measure_port))))
        return
    if args.official_python and not args.ref_dir:
        parser.error("--official-python needs --ref-dir, the official source tree")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir = convert_official_checkpoint(args.checkpoint, scratch / "converted")
        all_views = write_views(scratch, max(args.views))
        cases = [all_views[:count] for count in args.views]
        official, record = None, None
        if args.official_python:  # first, so that its records are there for the parity check
            record = scratch / "official-record.safetensors"
            command = [
                args.official_python, str(ROOT / "benchmarks" / "official_runner.py"), "--ref-dir", args.ref_dir,
                "--shim", str(SHIM), "--checkpoint", str(args.checkpoint), "--views", json.dumps(cases),
                "--decode-steps", str(args.decode_steps), "--repeats", str(args.repeats), "--threads", str(args.threads),
                "--record", str(record),
            ]  # fmt: skip
            official = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            )
        spec = dict(model_dir=str(model_dir), cases=cases, decode_steps=args.decode_steps, repeats=args.repeats,
                    long_context=args.long_context, threads=args.threads, record=None)  # fmt: skip
        before = measure_port(spec, args.before_src) if args.before_src else None
        port = measure_port({**spec, "record": str(record) if record else None})
        print_table(AutoConfig.from_pretrained(model_dir), port, before, official, args.threads)


if __name__ == "__main__":
    main()
