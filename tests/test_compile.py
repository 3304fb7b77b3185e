"""`torch.compile(fullgraph=True)` on a decode step with a static cache: no graph break, for every backend (the flash
path with its CPU stand-ins), and the compiled step computes what the eager step does."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_attention_backends import flash_attention_stand_in
from test_model import IMAGE_GRID, chat_prompt, image_patches, views
from transformers import StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling import text_decoder
from g2vlm_hf.modeling.compat import cache_kwargs
from g2vlm_hf.modeling.varlen_attention import reference_varlen_attention


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flash_attention_2"])
def test_a_static_cache_decode_step_compiles_without_graph_breaks(implementation, monkeypatch):
    # the flash path on a CPU: PyTorch stand-ins for flash_attn's kernels (see test_attention_backends)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in)
    monkeypatch.setattr(text_decoder, "varlen_kernel", lambda implementation: reference_varlen_attention)
    model = tiny_model()
    model.config.text_config._attn_implementation_internal = implementation
    assert model._can_compile_fullgraph
    pixels, grid = image_patches(*IMAGE_GRID)
    prompt = dict(
        input_ids=torch.tensor([chat_prompt([1, 5], [8, 9])]), pixel_values=pixels, image_grid_thw=grid,
        geometry_pixel_values=views(),
    )  # fmt: skip
    length = prompt["input_ids"].shape[1]

    def prefill() -> StaticCache:
        cache = StaticCache(config=model.config, max_cache_len=length + 4)
        model(**prompt, **cache_kwargs(cache), use_cache=True)
        return cache

    def step(token: torch.Tensor, position: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        return model(input_ids=token, position_ids=position, **cache_kwargs(cache), use_cache=True).logits

    token = torch.tensor([[11]])
    with torch.no_grad():
        cache = prefill()
        position = (length + model.model.rope_deltas).view(1, 1, 1).expand(3, 1, 1)  # the next M-RoPE position
        expected = step(token, position, cache)
        compiled = torch.compile(step, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
        actual = compiled(token, position, prefill())
    torch.testing.assert_close(actual, expected)
