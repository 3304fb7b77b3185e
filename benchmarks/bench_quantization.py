"""Quantized loading on the CPU: per method, the weights' memory, decode speed, the time of a 16-view reconstruction,
and how far world points and first-step logits move from float32. A script, never a test.

    python benchmarks/bench_quantization.py [--threads 1] [--views 16] [--new-tokens 32]

The model is a mid-size random G²VLM (config below: decoder 512 wide, 4 layers, MLP 1408, vocabulary 4096; vision
tower 128 wide; DINOv2 128 wide; heads 1 block each; views of 84x84 pixels, 36 geometry tokens each): big enough that
the matrix products dominate, small enough to run in a few minutes on two shared cores. Its weights are random (std 0.02), so the drift is that of random weights, not of the
released checkpoint. Methods: float32; bf16 (`dtype=torch.bfloat16`); int8 weight-only (torchao
`Int8WeightOnlyConfig`); nf4 (bitsandbytes, float32 compute); LLM.int8 (bitsandbytes 8-bit). The quantized methods
load the float32 checkpoint, so the unquantized parts (geometry heads, geometry encoder, projector, embeddings,
LM head, norms) stay in float32 and the drift is the quantization's alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import g2vlm_hf  # noqa: F401  (registers the Auto classes)
from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration

START, END, IMAGE, GEOMETRY = 4000, 4001, 4002, 4003
CONFIG = dict(
    text_config=dict(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    vision_config=dict(depth=2, embed_dim=128, hidden_size=512, num_heads=2, patch_size=14),
    geometry_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14, num_register_tokens=4),
    image_token_id=IMAGE, geometry_token_id=GEOMETRY, vision_start_token_id=START, vision_end_token_id=END,
    head_depth=1, head_num_attention_heads=8, point_head_hidden_size=128, camera_head_hidden_size=64,
    use_confidence_head=True,
)  # fmt: skip
VIEW_SIDE = 84  # 6 x 6 geometry patches per view


def methods() -> dict[str, Callable[[], dict]]:
    """`from_pretrained` keyword arguments of each method (built lazily: a missing backend skips its row)."""

    def torchao_int8() -> dict:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}

    def bitsandbytes(**kwargs) -> Callable[[], dict]:
        def build() -> dict:
            from transformers import BitsAndBytesConfig

            return {"quantization_config": BitsAndBytesConfig(**kwargs)}

        return build

    return {
        "float32": lambda: {"dtype": torch.float32},
        "bf16": lambda: {"dtype": torch.bfloat16},
        "int8 weight-only (torchao)": torchao_int8,
        "nf4 (bitsandbytes)": bitsandbytes(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        "LLM.int8 (bitsandbytes)": bitsandbytes(load_in_8bit=True),
    }


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; tensor subclasses (torchao) are counted through their inner tensors."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.nn.Parameter:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weights_bytes(model: torch.nn.Module) -> int:
    """The state dict's bytes (bitsandbytes adds its quantization state there), tied weights counted once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.shape) if not hasattr(tensor, "__tensor_flatten__") else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(tensor)
    return total


def prompt(views: int, grid: int) -> torch.Tensor:
    geometry = [START, *[GEOMETRY] * (grid * grid), END] * views
    return torch.tensor([[1, 5, *geometry, *range(10, 26)]])


def timed(function: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def measure(model: G2VLMForConditionalGeneration, views: int, new_tokens: int) -> dict:
    grid = VIEW_SIDE // 14
    generator = torch.Generator().manual_seed(0)
    scene = torch.randn(1, views, 3, VIEW_SIDE, VIEW_SIDE, generator=generator)
    chat_views = scene[:, :2]
    chat = dict(input_ids=prompt(2, grid), geometry_pixel_values=chat_views)
    recon_ids = torch.tensor([[1, 5, *[START, *[GEOMETRY] * (grid * grid), END] * views]])
    with torch.inference_mode():
        logits = model(**chat).logits[0, -1].float()

        def generate(count: int) -> torch.Tensor:
            return model.generate(**chat, max_new_tokens=count, min_new_tokens=count, do_sample=False)

        generate(2)  # warm-up
        one_s, _ = timed(lambda: generate(1))
        many_s, tokens = timed(lambda: generate(new_tokens + 1))
        model.reconstruct(input_ids=recon_ids[:, : 2 + 2 * (grid * grid + 2)], geometry_pixel_values=chat_views)
        recon_s, reconstruction = timed(lambda: model.reconstruct(input_ids=recon_ids, geometry_pixel_values=scene))
    return {
        "weights_bytes": weights_bytes(model),
        "decode_tok_s": new_tokens / (many_s - one_s),
        "recon_s": recon_s,
        "world_points": reconstruction.world_points,
        "logits": logits,
        "tokens": tokens[0, chat["input_ids"].shape[1] :],
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--views", type=int, default=16, help="views in the timed reconstruction")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = None
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "mid"
        G2VLMForConditionalGeneration(G2VLMConfig(**CONFIG)).save_pretrained(checkpoint)
        for name, build in methods().items():
            try:
                kwargs = build()
            except ImportError as error:
                print(f"{name}: skipped ({error})")
                continue
            model = G2VLMForConditionalGeneration.from_pretrained(checkpoint, **kwargs).eval()
            result = measure(model, args.views, args.new_tokens)
            del model
            reference = reference or result
            agree = int((result["tokens"] == reference["tokens"]).cumprod(0).sum())
            rows.append(
                (
                    name,
                    f"{result['weights_bytes'] / 2**20:.0f}",
                    f"{result['weights_bytes'] / reference['weights_bytes']:.2f}",
                    f"{result['decode_tok_s']:.1f}",
                    f"{result['recon_s']:.2f}",
                    f"{relative_error(result['world_points'], reference['world_points']):.1e}",
                    f"{relative_error(result['logits'], reference['logits']):.1e}",
                    f"{agree}/{args.new_tokens + 1}",
                )
            )
    header = (
        "method", "weights MiB", "vs f32", "decode tok/s", f"{args.views}-view recon s", "world points drift",
        "logits drift", "greedy = f32",
    )  # fmt: skip
    print(
        f"threads: {args.threads}; drift: relative L2 against float32; greedy = f32: leading tokens equal to float32's"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
