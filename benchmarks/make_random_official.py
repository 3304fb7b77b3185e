"""Write a full-size G²VLM-2B checkpoint with random weights in the OFFICIAL layout, for benchmarking the port
against the official code at full size (`bench_vs_official.py --checkpoint FOLDER`). A script, never a test.

    python benchmarks/make_random_official.py OUTPUT [--dtype bfloat16]

Keys and shapes come from ../shared/fixtures/official-2b-keys.json (the official modules built at the Qwen2-VL-2B
and DINOv2-L sizes); the configuration files are the tiny fixture's with the full sizes of that file; the tokenizer is
the fixture's. Weights: normal(0, 0.02), norm and LayerScale weights 1, biases 0, so activations stay finite.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = SHARED / "official-tiny" / "checkpoint"
KEYS = SHARED / "official-2b-keys.json"
CONFIG_FILES = {"text_config.json": "text_config", "vit_config.json": "vit_config", "dino_config.json": "dino_config"}


def random_tensor(name: str, shape: list[int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and ("norm" in name or name.endswith("gamma")):
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=generator).mul_(0.02).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    layout = json.loads(KEYS.read_text())
    dtype = getattr(torch, args.dtype)

    staging = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in TINY.iterdir():
        if path.name not in CONFIG_FILES and path.name != "model.safetensors":
            shutil.copy(path, staging / path.name)  # tokenizer and preprocessor files
    for file_name, section in CONFIG_FILES.items():
        config = {**json.loads((TINY / file_name).read_text()), **layout["configs"][section]}
        (staging / file_name).write_text(json.dumps(config, indent=2))

    generator = torch.Generator().manual_seed(0)
    state = {
        name: random_tensor(name, entry["shape"], dtype, generator)
        for name, entry in tqdm(layout["keys"].items(), desc="random weights")
    }
    save_file(state, staging / "model.safetensors")
    shutil.rmtree(args.output, ignore_errors=True)
    staging.rename(args.output)
    print(f"{sum(t.numel() for t in state.values()):,} parameters in {args.output}")


if __name__ == "__main__":
    main()
