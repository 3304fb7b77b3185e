"""Fast decoding by default: on CUDA, `generate()` gets a static key/value cache unless the user chose a cache.

With a static cache transformers compiles the decode step on CUDA by itself (its `compile_config`, default: inductor
with CUDA graphs), which the model supports as one graph (`_can_compile_fullgraph`, tests/test_compile.py): ~5x the
tokens per second of the dynamic cache on an H200. The prompt (prefill) runs uncompiled, images included.

The user's choice wins: a `cache_implementation` (from the call, a `GenerationConfig` or `model.generation_config`),
a cache passed in, or `use_cache=False`. Beam search, assisted and contrastive decoding keep transformers' default
(dynamic) cache; greedy and sampling (batched or not, streamed or not) get the static one. On the CPU nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache, StaticLayer
from transformers.generation.configuration_utils import GenerationMode

from .compat import output_cache

STATIC_DECODE_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def runs_on_cuda(model: torch.nn.Module) -> bool:
    """Whether `model` generates on a CUDA device (where its decode step is compiled)."""
    return model.device.type == "cuda"


def default_cache_implementation(
    model: torch.nn.Module,
    generation_config: GenerationConfig,
    model_kwargs: dict[str, Any],
    generation_mode: GenerationMode,
) -> str | None:
    """`"static"` when `generate()` on CUDA leaves the choice of cache to the model; None to keep transformers' choice."""
    user_chose = (
        generation_config.cache_implementation is not None
        or output_cache(model_kwargs) is not None
        or generation_config.use_cache is False
    )
    if user_chose or generation_mode not in STATIC_DECODE_MODES or not runs_on_cuda(model):
        return None
    return "static"


MARKED_KEYS_ATTRIBUTE = "g2vlm_marked_keys"
"""The attribute of a static cache holding its first layer's key tensor once `let_cache_length_vary` marked its
tensors (a cache whose layers made new tensors is marked again)."""


def let_cache_length_vary(cache: Cache | None, attention_mask: torch.Tensor | dict | None) -> None:
    """Tell torch.compile that a static cache's length varies, before the decode step is first compiled.

    `generate()` makes a longer static cache for a longer request (each turn of a chat), and a decode step compiled
    for one length would compile again for the next one (tens of seconds on a GPU) before dynamo made the length
    dynamic by itself. Marked here: the cache's key/value tensors, once per cache, and the step's attention mask,
    whose last dimension is the cache's length (a new tensor each step). A hint, not a constraint: without a compiler
    it changes nothing."""
    layers = getattr(cache, "layers", None)
    if not layers or not isinstance(layers[0], StaticLayer) or not layers[0].is_initialized:
        return
    masks = attention_mask.values() if isinstance(attention_mask, dict) else [attention_mask]
    for mask in masks:
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            torch._dynamo.maybe_mark_dynamic(mask, 3)
    if getattr(cache, MARKED_KEYS_ATTRIBUTE, None) is layers[0].keys:
        return
    for layer in layers:
        torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
        torch._dynamo.maybe_mark_dynamic(layer.values, 2)
    setattr(cache, MARKED_KEYS_ATTRIBUTE, layers[0].keys)


__all__ = ["default_cache_implementation", "let_cache_length_vary", "runs_on_cuda"]
