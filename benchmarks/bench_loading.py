"""Peak memory while loading full-size G²VLM-2B saved in bf16, against the weights' byte size, and the time to the
first generated token after the load. A script, never a test.

    python benchmarks/bench_loading.py [--folder /tmp/g2vlm-2b-bf16] [--keep]

Step 1 writes random bf16 weights of the 2B configuration (the model is built on the meta device and filled in bf16,
so writing never holds an fp32 copy either). Step 2 loads them with `from_pretrained(..., dtype=torch.bfloat16)` in
a fresh process, sampling its resident memory every 5 ms, then times one greedy token on a 64-token prompt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

GIB = 1024**3


def resident_bytes() -> dict[str, int]:
    """This process's resident memory by kind (anonymous: tensors it allocated; file: mapped files such as
    safetensors), from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakSampler:
    """Samples `resident_bytes()` in a background thread and keeps the maxima."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._stop = interval_s, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in resident_bytes().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_random_checkpoint(folder: Path) -> int:
    """Random 2B weights in bf16, sharded safetensors. Returns the weights' byte size."""
    from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration

    config = G2VLMConfig()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # meta parameters in bf16, so that to_empty allocates bf16
    try:
        with torch.device("meta"):
            model = G2VLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder, max_shard_size="2GB")
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def measure_load(folder: str) -> dict:
    """Runs in a fresh process: load in bf16 while sampling memory, then one greedy token."""
    from transformers import AutoModelForImageTextToText

    import g2vlm_hf  # noqa: F401

    torch.set_num_threads(2)
    baseline = resident_bytes()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    after = resident_bytes()
    prompt = torch.randint(0, 1000, (1, 64))
    start = time.perf_counter()
    with PeakSampler() as first_token_sampler, torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False)
    first_token_s = time.perf_counter() - start
    return {
        "baseline": baseline, "peak": sampler.peak, "after": after, "load_s": load_s,
        "first_token_peak": first_token_sampler.peak, "first_token_s": first_token_s,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/g2vlm-2b-bf16"))
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh loading process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_load(args.measure)))
        return

    if not (args.folder / "config.json").is_file():
        print(f"writing random 2B bf16 weights to {args.folder} ...", flush=True)
        write_random_checkpoint(args.folder)
    weight_bytes = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    child = subprocess.run(
        [sys.executable, __file__, "--measure", str(args.folder)], capture_output=True, text=True, check=True
    )
    result = json.loads(child.stdout.strip().splitlines()[-1])
    baseline, peak, after = result["baseline"], result["peak"], result["after"]

    first = result["first_token_peak"]
    rows = [
        ("safetensors files (bf16)", weight_bytes),
        ("peak resident during load", peak["VmRSS"] - baseline["VmRSS"]),
        ("  anonymous (allocated)", peak["RssAnon"] - baseline["RssAnon"]),
        ("  file-backed (mmap)", peak["RssFile"] - baseline["RssFile"]),
        ("resident after load", after["VmRSS"] - baseline["VmRSS"]),
        ("peak resident through 1st token", first["VmRSS"] - baseline["VmRSS"]),
        ("  anonymous (allocated)", first["RssAnon"] - baseline["RssAnon"]),
        ("  file-backed (mmap)", first["RssFile"] - baseline["RssFile"]),
    ]
    print(f"\n{'quantity (above the process before loading)':44} {'GiB':>7} {'x weights':>10}")
    for name, size in rows:
        print(f"{name:44} {size / GIB:7.2f} {size / weight_bytes:10.2f}")
    print(f"\nload {result['load_s']:.1f} s; first token after load (64-token prompt) {result['first_token_s']:.2f} s")
    print("safetensors are memory-mapped: weights kept in bf16 stay file-backed and are paged in when first used.")
    if not args.keep:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
