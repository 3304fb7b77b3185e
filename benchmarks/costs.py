"""Analytic FLOP and byte counts of G²VLM's work, and this machine's measured peaks, so that each benchmark figure
can be shown against its physical floor (time >= max(FLOPs / peak FLOP/s, bytes / peak bandwidth)).

`stage_costs` splits a reconstruction (or a chat prompt's semantic images) into its stages: geometry encoder (with its
projection into the decoder width), semantic encoder, trunk (the two-expert decoder) and each geometry head (point,
camera, global points, confidence). The bytes of a stage are the fewest it must move through memory: its weights and
its input read once, its output written once, at the precision the stage runs in (`StagePrecision`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from g2vlm_hf import G2VLMConfig


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def attention_flops(queries: int, keys: int, width: int) -> float:
    return 4.0 * queries * keys * width  # Q K^T and P V


@dataclass(frozen=True)
class StagePrecision:
    """Bytes per value of each part as it runs: the trunk and the encoders in the model's dtype (bf16 on a GPU); the
    geometry heads' weights and output heads in float32, their decoders' matrix products under autocast to the
    trunk's dtype (`head_decoders`; 4 with `head_decoder_precision="float32"` or a float32 model), as in the official
    code on a GPU."""

    trunk: int = 2
    geometry_encoder: int = 2
    semantic_encoder: int = 2
    heads: int = 4
    head_decoders: int = 2

    @classmethod
    def float32(cls) -> StagePrecision:
        """Every part in float32 (a float32 model, as on a CPU)."""
        return cls(trunk=4, geometry_encoder=4, semantic_encoder=4, heads=4, head_decoders=4)


@dataclass(frozen=True)
class StageCost:
    """One stage's work: `flops`, `bytes` (weights + input read once, output written once) and the kind of arithmetic
    that runs it (`"half"`: bf16/fp16 matrix units, `"float32"`: TF32 or true fp32 by the global flag), except its
    `float32_flops` (part of `flops`), which run in float32 whatever `arithmetic` says (a geometry head's output
    head after its decoder)."""

    name: str
    flops: float
    bytes: float
    arithmetic: str
    float32_flops: float = 0.0

    def floor(self, peaks: dict[str, float], bandwidth: float) -> float:
        """max(FLOPs / the peak of their arithmetic, bytes / bandwidth), in seconds."""
        compute = (self.flops - self.float32_flops) / peaks[self.arithmetic] + self.float32_flops / peaks["float32"]
        return max(compute, self.bytes / bandwidth)


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


def decoder_expert_parameters(config: G2VLMConfig) -> int:
    """Weights of one expert over all decoder layers (projections and MLP; norms are negligible)."""
    text = config.text_config
    d, head_dim = text.hidden_size, text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    return text.num_hidden_layers * (d * (d + 2 * kv) + d * d + 3 * d * text.intermediate_size)


def geometry_encoder_flops(config: G2VLMConfig, views: int, patches: int) -> float:
    """DINOv2 over each view (patch embedding, blocks) and the projection of its patch tokens into the decoder width."""
    dino = config.geometry_config
    tokens, d = patches + 1 + dino.num_register_tokens, dino.hidden_size
    per_layer = linear_flops(tokens, d, 4 * d) + linear_flops(tokens, d, int(d * dino.mlp_ratio)) * 2
    per_layer += attention_flops(tokens, tokens, d)
    embed = linear_flops(patches, 3 * dino.patch_size**2, d)
    projector = linear_flops(patches, d, config.text_config.hidden_size)
    return views * (per_layer * dino.num_hidden_layers + embed + projector)


def geometry_encoder_parameters(config: G2VLMConfig) -> int:
    dino = config.geometry_config
    d = dino.hidden_size
    per_layer = 4 * d * d + 2 * d * int(d * dino.mlp_ratio)
    grid = dino.image_size // dino.patch_size
    return (
        dino.num_hidden_layers * per_layer
        + 3 * dino.patch_size**2 * d
        + (grid * grid + 1) * d
        + d * config.text_config.hidden_size
    )


def semantic_encoder_flops(config: G2VLMConfig, images: int, side: int) -> float:
    """The Qwen2-VL vision tower over `images` square images of `side` pixels (patch embedding, blocks, 2x2 merger)."""
    vision = config.vision_config
    e, merge = vision.embed_dim, vision.spatial_merge_size
    grid = (side // vision.patch_size) // merge * merge
    patches = grid * grid
    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    block = linear_flops(patches, e, 4 * e) + 2 * linear_flops(patches, e, int(e * vision.mlp_ratio))
    block += attention_flops(patches, patches, e)
    merged, wide = patches // merge**2, e * merge**2
    merger = linear_flops(merged, wide, wide) + linear_flops(merged, wide, vision.hidden_size)
    return images * (linear_flops(patches, patch_values, e) + vision.depth * block + merger)


def semantic_encoder_parameters(config: G2VLMConfig) -> int:
    vision = config.vision_config
    e, wide = vision.embed_dim, vision.embed_dim * vision.spatial_merge_size**2
    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return (
        vision.depth * (4 * e * e + 2 * e * int(e * vision.mlp_ratio))
        + patch_values * e
        + wide * wide
        + wide * vision.hidden_size
    )


def _head_block(config: G2VLMConfig, patches: int) -> tuple[float, int]:
    """FLOPs per view and weights of one self-attention block of a head decoder."""
    d, hidden = config.text_config.hidden_size, int(config.text_config.hidden_size * config.head_mlp_ratio)
    flops = (
        linear_flops(patches, d, 4 * d) + 2 * linear_flops(patches, d, hidden) + attention_flops(patches, patches, d)
    )
    return flops, 4 * d * d + 2 * d * hidden


@dataclass(frozen=True)
class HeadCost:
    """One geometry head with its decoder: FLOPs of the decoder and of the output head, weights (matrices), output
    values."""

    decoder_flops: float
    head_flops: float
    weights: int
    outputs: int

    @property
    def flops(self) -> float:
        return self.decoder_flops + self.head_flops


def head_costs(config: G2VLMConfig, views: int, patches: int, pixels: int, scenes: int = 1) -> dict[str, HeadCost]:
    """Per head, with its decoder, for `views` views of `patches` patch tokens and `pixels` pixels."""
    d, depth, pixel = config.text_config.hidden_size, config.head_depth, config.geometry_patch_size**2
    point, camera = config.point_head_hidden_size, config.camera_head_hidden_size
    block_flops, block_weights = _head_block(config, patches)
    decoder_flops_, decoder_weights = depth * block_flops, depth * block_weights

    def pixel_head(width: int, channels: int) -> tuple[float, int]:
        flops = linear_flops(patches, d, width) + linear_flops(patches, width, channels * pixel)
        return flops, d * width + width * channels * pixel

    costs = {}
    flops, weights = pixel_head(point, 3)
    costs["point head"] = HeadCost(views * decoder_flops_, views * flops, decoder_weights + weights, views * pixels * 3)
    camera_mlp = 2 * 3 * linear_flops(patches, camera, camera)  # two residual blocks of three layers, every patch
    pose = 2 * linear_flops(1, camera, camera) + linear_flops(1, camera, 12)
    costs["camera head"] = HeadCost(
        views * decoder_flops_,
        views * (linear_flops(patches, d, camera) + camera_mlp + pose),
        decoder_weights + d * camera + 8 * camera * camera + 12 * camera,
        views * 16,
    )
    if config.use_global_points:
        # per block also a cross-attention: queries and output projection per view, keys and values of the first
        # view once per scene, and the attention of every view to it
        cross = views * (2 * linear_flops(patches, d, d) + attention_flops(patches, patches, d))
        cross += scenes * 2 * linear_flops(patches, d, d)
        flops, weights = pixel_head(point, 3)
        costs["global points head"] = HeadCost(
            views * decoder_flops_ + depth * cross,
            views * flops,
            decoder_weights + depth * 4 * d * d + weights,
            views * pixels * 3,
        )
    if config.use_confidence_head:
        flops, weights = pixel_head(point, 1)
        costs["confidence head"] = HeadCost(
            views * decoder_flops_, views * flops, decoder_weights + weights, views * pixels
        )
    return costs


def stage_costs(
    config: G2VLMConfig,
    views: int,
    height: int,
    width: int,
    *,
    prompt_tokens: int = 8,
    images: int = 0,
    image_side: int = 768,
    precision: StagePrecision | None = None,
) -> list[StageCost]:
    """The stages of one scene of `views` views of `height` x `width` (and `images` semantic images of `image_side`,
    as in a chat prompt; none in a reconstruction), with their FLOPs and fewest bytes."""
    precision = precision or StagePrecision()
    patch = config.geometry_patch_size
    patches = (height // patch) * (width // patch)
    d = config.text_config.hidden_size
    stages = [
        StageCost(
            "geometry encoder",
            geometry_encoder_flops(config, views, patches),
            precision.geometry_encoder * (geometry_encoder_parameters(config) + views * patches * d)
            + 4 * views * 3 * height * width,  # float32 pixels in
            "half" if precision.geometry_encoder < 4 else "float32",
        )
    ]
    image_tokens = 0
    if images and config.vision_config is not None:
        vision = config.vision_config
        grid = (image_side // vision.patch_size) // vision.spatial_merge_size * vision.spatial_merge_size
        image_tokens = images * grid * grid // vision.spatial_merge_size**2
        pixel_values = images * grid * grid * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        stages.append(
            StageCost(
                "semantic encoder",
                semantic_encoder_flops(config, images, image_side),
                precision.semantic_encoder * (semantic_encoder_parameters(config) + image_tokens * d)
                + 4 * pixel_values,
                "half" if precision.semantic_encoder < 4 else "float32",
            )
        )
    tokens = prompt_tokens + views * (patches + 2) + images * 2 + image_tokens
    stages.append(
        StageCost(
            "trunk",
            decoder_flops(config, tokens),
            precision.trunk * (2 * decoder_expert_parameters(config) + 2 * tokens * d),
            "half" if precision.trunk < 4 else "float32",
        )
    )
    heads_input = precision.trunk * views * patches * d
    for name, head in head_costs(config, views, patches, height * width).items():
        stages.append(
            StageCost(
                name,
                head.flops,
                precision.heads * head.weights + heads_input + 4 * head.outputs,
                "half" if precision.head_decoders < 4 else "float32",
                float32_flops=head.head_flops if precision.heads == 4 else 0.0,
            )
        )
    return stages


def heads_flops(config: G2VLMConfig, views: int, patches: int) -> float:
    """All geometry heads of `views` views of `patches` patch tokens."""
    pixels = patches * config.geometry_patch_size**2
    return sum(head.flops for head in head_costs(config, views, patches, pixels).values())


def reconstruction_flops(config: G2VLMConfig, views: int, height: int, width: int, prompt_tokens: int = 8) -> float:
    """Geometry encoder + decoder over the reconstruction prompt + geometry heads."""
    return sum(stage.flops for stage in stage_costs(config, views, height, width, prompt_tokens=prompt_tokens))


def reconstruction_floor(
    config: G2VLMConfig, views: int, height: int, width: int, peaks: dict[str, float], bandwidth: float, **kwargs
) -> float:
    """Sum over the stages of each one's floor: the trunk, encoders and head decoders at the half-precision peak, the
    output heads at the float32 peak (TF32 or true fp32, whichever `peaks["float32"]` was measured with)."""
    return sum(stage.floor(peaks, bandwidth) for stage in stage_costs(config, views, height, width, **kwargs))


def decode_bytes_per_token(config: G2VLMConfig, context: int, batch: int = 1, bytes_per_value: int = 4) -> float:
    """Bytes a decode step must read: the semantic expert's weights and the LM head once, each row's KV cache."""
    text = config.text_config
    d, layers = text.hidden_size, text.num_hidden_layers
    kv = text.num_key_value_heads * (d // text.num_attention_heads)
    lm_head = text.vocab_size * d
    cache = batch * layers * 2 * context * kv
    return bytes_per_value * (decoder_expert_parameters(config) + lm_head + cache)


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
