"""A chat session as `generate()` runs it by default on CUDA: a static cache and the decode step compiled by
transformers (inductor), over turns whose prompts grow as a conversation does.

Per turn: the seconds of the whole call (compiling included), decode tok/s and dynamo's graphs so far. A turn that
compiles the step again shows as a long call and one graph more. On the CPU the step is compiled as on CUDA (without
CUDA graphs), so the compile times are the CPU's, not a GPU's.

    python benchmarks/bench_chat_turns.py                       # tiny config, random weights, CPU
    python benchmarks/bench_chat_turns.py --size full --turns 4  # G²VLM-2B's shape, random weights, CUDA if present
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import profile_stages
from bench_vs_official import TokenClock

from g2vlm_hf import G2VLMForConditionalGeneration


def chat_session(model, turns: int, first_prompt: int, growth: int, new_tokens: int) -> list[dict]:
    """`turns` calls of `generate()` whose prompts grow by `growth` tokens, each with its timings and graph count."""
    compile_config = CompileConfig()  # transformers' default: inductor, CUDA graphs where there is CUDA
    compile_config._compile_all_devices = True  # transformers compiles by itself on accelerators only
    vocab = bench_gpu.plain_text_ids(model.config)
    torch._dynamo.reset()
    counters.clear()
    rows = []
    for turn in range(turns):
        length = first_prompt + turn * growth
        ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(turn)).to(model.device)
        clock = TokenClock()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                       compile_config=compile_config, streamer=clock)  # fmt: skip
        seconds = time.perf_counter() - start
        decode = clock.times[1:]  # from the first decode step's token on (the step that compiles)
        rows.append({"turn": turn + 1, "prompt": length, "seconds": seconds,
                     "tok_per_s": (len(decode) - 1) / (decode[-1] - decode[0]),
                     "graphs": counters["stats"]["unique_graphs"]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="tiny")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--first-prompt", type=int, default=256)
    parser.add_argument("--growth", type=int, default=96, help="tokens each turn adds to the prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = G2VLMForConditionalGeneration._from_config(profile_stages.config_for(args.size), dtype=dtype).eval()
    rows = chat_session(model, args.turns, args.first_prompt, args.growth, args.new_tokens)
    print(f"chat turns, {args.size} model, {device.type} ({dtype}), {args.new_tokens} new tokens a turn")
    print(f"{'turn':>4} {'prompt':>7} {'call s':>8} {'decode tok/s':>13} {'graphs':>7}")
    for row in rows:
        print(
            f"{row['turn']:>4} {row['prompt']:>7} {row['seconds']:>8.2f} {row['tok_per_s']:>13.1f} {row['graphs']:>7}"
        )
    return rows


if __name__ == "__main__":
    main()
