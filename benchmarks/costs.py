"""Analytic FLOP and byte counts of G²VLM's work, and this machine's measured peaks, so that each benchmark figure
can be shown against its physical floor (time >= max(FLOPs / peak FLOP/s, bytes / peak bandwidth))."""

import time

import torch

from g2vlm_hf import G2VLMConfig


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def attention_flops(queries: int, keys: int, width: int) -> float:
    return 4.0 * queries * keys * width  # Q K^T and P V


def decoder_flops(config: G2VLMConfig, tokens: int, keys: int | None = None) -> float:
    """One pass of `tokens` tokens (each through one expert) over `keys` keys, all decoder layers."""
    text = config.text_config
    d, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = d // heads
    keys = tokens if keys is None else keys
    per_layer = (
        linear_flops(tokens, d, (heads + 2 * kv_heads) * head_dim)
        + linear_flops(tokens, heads * head_dim, d)
        + 3 * linear_flops(tokens, d, text.intermediate_size)
        + attention_flops(tokens, keys, heads * head_dim)
    )
    return per_layer * text.num_hidden_layers


def geometry_encoder_flops(config: G2VLMConfig, views: int, patches: int) -> float:
    dino = config.geometry_config
    tokens, d = patches + 1 + dino.num_register_tokens, dino.hidden_size
    per_layer = linear_flops(tokens, d, 4 * d) + linear_flops(tokens, d, int(d * dino.mlp_ratio)) * 2
    per_layer += attention_flops(tokens, tokens, d)
    return views * per_layer * dino.num_hidden_layers


def heads_flops(config: G2VLMConfig, views: int, patches: int) -> float:
    d = config.text_config.hidden_size
    block = linear_flops(patches, d, 4 * d) + 2 * linear_flops(patches, d, int(d * config.head_mlp_ratio))
    block += attention_flops(patches, patches, d)
    cross = linear_flops(patches, d, 4 * d) + attention_flops(patches, patches, d)
    decoders = (2 + config.use_global_points) * config.head_depth * block + config.use_global_points * config.head_depth * cross
    outputs = 2 * linear_flops(patches, d, config.point_head_hidden_size) + linear_flops(patches, d, config.camera_head_hidden_size)
    pixels = 2 * linear_flops(patches, config.point_head_hidden_size, 3 * config.geometry_patch_size**2)
    return views * (decoders + outputs + pixels)


def reconstruction_flops(config: G2VLMConfig, views: int, height: int, width: int, prompt_tokens: int = 8) -> float:
    """Geometry encoder + decoder over the reconstruction prompt + geometry heads."""
    patches = (height // config.geometry_patch_size) * (width // config.geometry_patch_size)
    tokens = prompt_tokens + views * (patches + 2)
    return (
        geometry_encoder_flops(config, views, patches)
        + decoder_flops(config, tokens)
        + heads_flops(config, views, patches)
    )


def decode_bytes_per_token(config: G2VLMConfig, context: int, batch: int = 1, bytes_per_value: int = 4) -> float:
    """Bytes a decode step must read: the semantic expert's weights and the LM head once, each row's KV cache."""
    text = config.text_config
    d, layers, inter = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    head_dim = d // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    expert = layers * (d * (d + 2 * kv) + d * d + 3 * d * inter)  # one expert: the geometry expert stays idle
    lm_head = text.vocab_size * d
    cache = batch * layers * 2 * context * kv
    return bytes_per_value * (expert + lm_head + cache)


def measure_peaks(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Achievable float32 matmul FLOP/s and copy bandwidth (bytes/s) of this machine, best of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    flops = 2.0 * size**3 / best
    source, target = torch.empty(64 * 2**20 // 4), torch.empty(64 * 2**20 // 4)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    bandwidth = 2.0 * source.numel() * 4 / best  # read + write
    return flops, bandwidth


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
