"""Attention backends compute the same function: eager (the reference), sdpa, flex attention, and the
flash-attention path (mixed causal / bidirectional runs through varlen kernels), plus static-cache decoding.

Without a GPU the flash path is run with `reference_varlen_attention`, an exact PyTorch implementation of
`flash_attn_varlen_func`'s semantics; the real kernel is checked by the CUDA tests at the end (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_model import GRID_H, GRID_W, IMAGE_GRID, VIEWS, chat_prompt, geometry_block, image_patches, views
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling import text_decoder
from g2vlm_hf.modeling.token_layout import TEXT_BLOCK_ID
from g2vlm_hf.modeling.varlen_attention import (
    bottom_right_causal_mask,
    plan_varlen_attention,
    reference_varlen_attention,
    sdpa_varlen_attention,
)


def dense_reference(query, key, value, attention_mask, block_ids, past_length, scaling):
    """Eager attention with the dense mask transformers builds for the same layout."""
    config = tiny_config().text_config
    config._attn_implementation = "eager"
    batch, heads, q_len, _dim = query.shape
    padded_blocks = None
    if block_ids is not None:
        padded_blocks = torch.nn.functional.pad(block_ids, (past_length, 0), value=TEXT_BLOCK_ID)

    cache = None
    if past_length:  # a real cache holding `past_length` tokens, which is all create_causal_mask reads from it
        cache = DynamicCache(config=config)
        cache.update(key[:, :, :past_length], value[:, :, :past_length], layer_idx=0)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=query.new_zeros(batch, q_len, 1),
        attention_mask=attention_mask,
        past_key_values=cache,
        block_sequence_ids=padded_blocks,
    )
    groups = heads // key.shape[1]
    scores = query @ key.repeat_interleave(groups, 1).transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ value.repeat_interleave(groups, 1)).transpose(1, 2)


@pytest.mark.parametrize("past_length", [0, 5])
@pytest.mark.parametrize("with_padding", [False, True])
def test_varlen_plan_equals_the_dense_mask(past_length, with_padding):
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, dim = 2, 4, 2, 12, 16
    kv_len = past_length + q_len
    query = torch.randn(batch, heads, q_len, dim)
    key, value = torch.randn(batch, kv_heads, kv_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    blocks = torch.full((batch, q_len), TEXT_BLOCK_ID)
    blocks[0, 2:6], blocks[0, 6:9], blocks[1, 4:11] = 0, 1, 0  # two blocks in row 0, one in row 1
    attention_mask = torch.ones(batch, kv_len, dtype=torch.long)
    if with_padding:
        attention_mask[1, :3] = 0  # left padding of row 1
    expected = dense_reference(query, key, value, attention_mask, blocks, past_length, dim**-0.5)
    valid = attention_mask[:, past_length:].bool()
    varlen_attention = ALL_ATTENTION_FUNCTIONS["g2vlm_varlen"]  # the layer calls it through the registry
    for kernel in (reference_varlen_attention, sdpa_varlen_attention):
        plan = plan_varlen_attention(batch, q_len, past_length, attention_mask, blocks, query.device, kernel)
        assert {group.causal for group in plan.groups} == {True, False}
        actual, weights = varlen_attention(None, query, key, value, plan, dim**-0.5)
        assert weights is None
        torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(actual[~valid]) == 0


def test_a_chunk_that_is_one_image_block_never_gives_a_kernel_an_empty_batch():
    # flash-attn's varlen kernels need at least one segment; a chunk without text has no causal run
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    blocks = torch.zeros(1, 6, dtype=torch.long)
    batches = []

    def kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
        batches.append(cu_seqlens_q.numel() - 1)
        assert q.shape[0] == cu_seqlens_q[-1] and k.shape[0] == cu_seqlens_k[-1]
        return reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)

    plan = plan_varlen_attention(1, 6, 0, None, blocks, query.device, kernel)
    actual, _ = ALL_ATTENTION_FUNCTIONS["g2vlm_varlen"](None, query, key, value, plan, 8**-0.5)
    assert min(batches) >= 1
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2)  # bidirectional
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_reference_varlen_aligns_causal_masks_bottom_right():
    q, k, v = torch.randn(2, 1, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4)
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    out = reference_varlen_attention(q, k, v, cu_q, cu_k, 2, 5, causal=True)
    # the first query is the 4th token of its segment: it sees keys 0..3, not key 4
    scores = (q[0, 0] @ k[:4, 0].T) * 0.5
    torch.testing.assert_close(out[0, 0], scores.softmax(-1) @ v[:4, 0])


def flash_attention_stand_in(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' flash-attention interface (2D padding mask, causal aligned bottom-right) in plain PyTorch."""
    q_len, kv_len = query.shape[2], key.shape[2]
    allowed = bottom_right_causal_mask(q_len, kv_len, query.device)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).nan_to_num(), None  # padded query rows see nothing


@pytest.fixture
def flash_path_on_cpu(monkeypatch):
    """The model's flash-attention path with PyTorch stand-ins for flash_attn's kernels (absent on CPUs): the
    reference varlen kernel for chunks with image blocks, and a stand-in registered as "flash_attention_2" in
    transformers' attention registry for plain text and decode steps."""
    monkeypatch.setattr(text_decoder, "varlen_kernel", lambda implementation: reference_varlen_attention)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in)

    def enable(model):
        model.config.text_config._attn_implementation_internal = "flash_attention_2"
        return model

    return enable


def padded_chat_inputs() -> dict:
    prompts = [chat_prompt([1, 5], [8, 9, 10]), chat_prompt([1, 5, 6, 7, 12, 13], [8])]
    width = max(len(p) for p in prompts)
    pixels = [image_patches(*IMAGE_GRID, seed=row) for row in range(2)]
    return dict(
        input_ids=torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
        attention_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        pixel_values=torch.cat([p for p, _ in pixels]),
        image_grid_thw=torch.cat([g for _, g in pixels]),
        geometry_pixel_values=views(batch=2),
    )


def test_flash_path_matches_eager_for_a_padded_multimodal_batch(flash_path_on_cpu):
    inputs = padded_chat_inputs()
    reference, flash = tiny_model(seed=2), flash_path_on_cpu(tiny_model(seed=2))
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = flash(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        recon_ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])
        scene = views()
        torch.testing.assert_close(
            flash.reconstruct(input_ids=recon_ids, geometry_pixel_values=scene).world_points,
            reference.reconstruct(input_ids=recon_ids, geometry_pixel_values=scene).world_points,
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip


def test_flash_path_generates_like_sdpa_with_a_cache(flash_path_on_cpu):
    inputs = padded_chat_inputs()
    reference, flash = tiny_model(seed=2), flash_path_on_cpu(tiny_model(seed=2))
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=5, do_sample=False)
        actual = flash.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(actual, expected)


def test_flex_attention_matches_eager():
    """flex attention gets the mixed mask as a BlockMask (the first call compiles flex_attention, ~40 s on CPU)."""
    inputs = padded_chat_inputs()
    reference, flex = tiny_model(seed=4), tiny_model(seed=4)
    reference.set_attn_implementation("eager")
    flex.set_attn_implementation("flex_attention")
    assert flex.model.visual.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = flex(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_static_cache_generation_equals_dynamic(batched):
    inputs = padded_chat_inputs()
    if not batched:  # one unpadded prompt: generate() drops the all-ones mask
        keep = inputs["attention_mask"][1].bool()
        inputs = {
            "input_ids": inputs["input_ids"][1:, keep],
            "pixel_values": inputs["pixel_values"][16:],
            "image_grid_thw": inputs["image_grid_thw"][1:],
            "geometry_pixel_values": inputs["geometry_pixel_values"][1:],
        }
    model = tiny_model(seed=5)
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_flash_without_the_package_names_the_alternatives():
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine flash_attn may be installed")
    with pytest.raises((ImportError, ValueError), match="attn_implementation='sdpa'"):
        tiny_model().set_attn_implementation("flash_attention_2")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (flash-attention kernels)")


@requires_cuda
def test_real_flash_kernel_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn", reason="flash_attn is not installed")
    inputs = {k: v.cuda() for k, v in padded_chat_inputs().items()}
    reference = tiny_model(seed=2).to("cuda", torch.bfloat16)
    flash = tiny_model(seed=2).to("cuda", torch.bfloat16)
    flash.set_attn_implementation("flash_attention_2")
    with torch.no_grad():
        expected = reference(**inputs).logits.float()
        actual = flash(**inputs).logits.float()
    valid = inputs["attention_mask"].bool()
    assert float((actual[valid] - expected[valid]).norm() / expected[valid].norm()) < 2e-2
