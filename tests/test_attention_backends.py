"""Attention backends compute the same function: eager (the reference), sdpa, flex attention, and the
flash-attention path (mixed causal / bidirectional runs through varlen calls), plus static-cache decoding.

Without a GPU the flash path is run with `reference_varlen_attention`, an exact PyTorch implementation of
`flash_attn_varlen_func`'s semantics: once behind transformers' own flash-attention function (its kernel loader
pointed at the reference), and in the other tests through a stand-in registered as "flash_attention_2". The real
kernel is checked by the CUDA tests at the end (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from conftest import Call, recording, spy_calls, tiny_config, tiny_model
from test_model import GRID_H, GRID_W, IMAGE_GRID, VIEWS, chat_prompt, geometry_block, image_patches, views
from torch.nn.attention.flex_attention import BlockMask
from transformers import DynamicCache, StaticCache, modeling_flash_attention_utils
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling import block_attention, text_decoder
from g2vlm_hf.modeling.block_attention import attend_query_chunks, prefix_layout
from g2vlm_hf.modeling.compat import cache_kwargs
from g2vlm_hf.modeling.token_layout import TEXT_BLOCK_ID
from g2vlm_hf.modeling.varlen_attention import attend_packed_runs, pack_runs


def segments(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """`(q_start, q_end, k_start, k_end)` of each packed segment."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for index in range(len(bounds_q) - 1):
        yield bounds_q[index], bounds_q[index + 1], bounds_k[index], bounds_k[index + 1]


def bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """`(q_len, k_len)` bool mask: query i sees keys up to i + (k_len - q_len), as flash-attention aligns it."""
    offset = k_len - q_len
    return torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """`flash_attn_varlen_func`'s semantics in plain PyTorch (grouped-query heads, one attention per segment, causal
    mask aligned to the bottom right). No dropout."""
    assert not dropout_p
    output = q.new_empty(q.shape)
    groups = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    for q0, q1, k0, k1 in segments(cu_seqlens_q, cu_seqlens_k):
        seg_q = q[q0:q1].transpose(0, 1).float()
        seg_k = k[k0:k1].repeat_interleave(groups, dim=1).transpose(0, 1).float()
        seg_v = v[k0:k1].repeat_interleave(groups, dim=1).transpose(0, 1).float()
        scores = seg_q @ seg_k.transpose(-1, -2) * scale
        if causal:
            scores = scores.masked_fill(~bottom_right_causal_mask(q1 - q0, k1 - k0, scores.device), float("-inf"))
        output[q0:q1] = (scores.softmax(-1) @ seg_v).transpose(0, 1).to(q.dtype)
    return output


def flash_attention_stand_in(varlen_kernel=reference_varlen_attention):
    """transformers' flash-attention function in plain PyTorch: packed sequences with `cu_seq_lens_q/k` go to
    `varlen_kernel`; otherwise a 2D padding mask (key buffers longer than it cut to its length, as transformers does
    for a static cache) and a causal mask aligned bottom-right."""

    def flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):  # fmt: skip
        is_causal = module.is_causal if is_causal is None else is_causal
        if cu_seq_lens_q is not None:
            q, k, v = (states.transpose(1, 2).flatten(0, 1) for states in (query, key, value))
            output = varlen_kernel(
                q, k, v, cu_seqlens_q=cu_seq_lens_q, cu_seqlens_k=cu_seq_lens_k, max_seqlen_q=max_length_q,
                max_seqlen_k=max_length_k, dropout_p=dropout, softmax_scale=scaling, causal=is_causal,
            )  # fmt: skip
            return output.view(query.shape[0], -1, *output.shape[1:]), None
        if attention_mask is not None and key.shape[2] > attention_mask.shape[-1]:
            # a static cache's buffers are longer than the 2D mask: transformers' flash function cuts them to it
            key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
        q_len, kv_len = query.shape[2], key.shape[2]
        allowed = bottom_right_causal_mask(q_len, kv_len, query.device)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=True
        )
        return output.transpose(1, 2).nan_to_num(), None  # padded query rows see nothing

    return flash_attention


def varlen_queries_per_layer(calls: list[Call]) -> list[int]:
    """The queries that each layer's two varlen kernel calls (causal runs, then bidirectional runs) attended, from the
    recorded calls of the kernel (packed queries first), less the one-query sentinel segment each call ends with
    (varlen_attention.VarlenGroup)."""
    assert len(calls) % 2 == 0, f"{len(calls)} varlen calls: not two per layer"
    queries = [int(call.args[0].shape[0]) - 1 for call in calls]
    return [queries[index] + queries[index + 1] for index in range(0, len(queries), 2)]


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
def test_packed_runs_equal_the_dense_mask(past_length, with_padding):
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
    runs = pack_runs(q_len, past_length, attention_mask, blocks)
    assert [group.causal for group in runs.groups] == [True, False]
    actual = attend_packed_runs(None, flash_attention_stand_in(), query, key, value, runs, scaling=dim**-0.5)
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

    runs = pack_runs(6, 0, None, blocks)
    actual = attend_packed_runs(None, flash_attention_stand_in(kernel), query, key, value, runs, scaling=8**-0.5)
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


class FlashPathOnCpu:
    """Puts a model on the flash-attention path with a PyTorch stand-in for transformers' flash-attention function
    (flash_attn is absent on CPUs), registered as "flash_attention_2" in transformers' attention registry; records
    the calls of its varlen kernel and of sdpa by query slices (which the flash path must not use)."""

    def __init__(self, monkeypatch):
        self.varlen_calls: list[Call] = []
        kernel = recording(reference_varlen_attention, self.varlen_calls)
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in(kernel))
        self.query_slices = spy_calls(monkeypatch, text_decoder, "attend_query_chunks")

    def __call__(self, model):
        model.config.text_config._attn_implementation_internal = "flash_attention_2"
        return model

    def assert_packed(self, model, tokens: int) -> None:
        """Since the last check, every layer attended `tokens` queries by varlen calls and none by query slices."""
        layers = model.config.text_config.num_hidden_layers
        assert varlen_queries_per_layer(self.varlen_calls) == [tokens] * layers
        assert self.query_slices == [], "the flash path attended by sdpa query slices"
        self.varlen_calls.clear()


@pytest.fixture
def flash_path_on_cpu(monkeypatch) -> FlashPathOnCpu:
    return FlashPathOnCpu(monkeypatch)


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
    flash_path_on_cpu.assert_packed(flash, int(valid.sum()))
    with torch.no_grad():
        recon_ids = torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]])
        scene = views()
        torch.testing.assert_close(
            flash.reconstruct(input_ids=recon_ids, geometry_pixel_values=scene).world_points,
            reference.reconstruct(input_ids=recon_ids, geometry_pixel_values=scene).world_points,
            rtol=1e-4, atol=1e-5,
        )  # fmt: skip
    flash_path_on_cpu.assert_packed(flash, recon_ids.shape[1])


def test_the_varlen_calls_run_through_transformers_flash_attention_function(monkeypatch):
    """transformers' own flash-attention function, unchanged, with its kernel loader pointed at the reference varlen
    kernel: the packed runs reach `flash_attn_varlen_func` as transformers hands them over, and match eager."""
    varlen_calls: list[Call] = []
    kernel = recording(reference_varlen_attention, varlen_calls)
    process_kwargs = modeling_flash_attention_utils._lazy_define_process_function(kernel)
    kernels = ((None, kernel, None, None, None), (process_kwargs, dict))
    monkeypatch.setattr(modeling_flash_attention_utils, "lazy_import_flash_attention", lambda *args, **kw: kernels)
    query_slices = spy_calls(monkeypatch, text_decoder, "attend_query_chunks")
    reference, flash = tiny_model(seed=2), tiny_model(seed=2)
    reference.set_attn_implementation("eager")
    flash.config.text_config._attn_implementation_internal = "flash_attention_2"
    ids = [1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]
    inputs = dict(
        input_ids=torch.tensor([ids, [0, 0, *ids[2:]]]),  # text then a geometry block; row 1 left-padded
        attention_mask=torch.tensor([[1] * len(ids), [0, 0] + [1] * (len(ids) - 2)]),
        geometry_pixel_values=views(batch=2),
    )
    with torch.no_grad():
        expected = reference.reconstruct(**inputs).world_points
        actual = flash.reconstruct(**inputs).world_points
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # every layer: all valid tokens through the varlen kernel (causal and bidirectional runs), none by query slices
    layers = flash.config.text_config.num_hidden_layers
    assert varlen_queries_per_layer(varlen_calls) == [int(inputs["attention_mask"].sum())] * layers
    assert query_slices == []


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_flash_path_generates_like_sdpa_with_a_cache(flash_path_on_cpu, cache_implementation):
    inputs = padded_chat_inputs()
    reference, flash = tiny_model(seed=2), flash_path_on_cpu(tiny_model(seed=2))
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=5, do_sample=False)
    flash_path_on_cpu.query_slices.clear()  # sdpa's, the reference's
    with torch.no_grad():
        actual = flash.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation=cache_implementation)
    assert torch.equal(actual, expected)
    flash_path_on_cpu.assert_packed(flash, int(inputs["attention_mask"].sum()))  # the prompt; decode steps are text


def test_flash_path_prefills_a_static_cache_like_eager(flash_path_on_cpu):
    # On CUDA a chat's prompt goes through the packed runs into a static cache (the default there): its key buffers
    # are longer than the prompt, so each row's keys lie a buffer apart in the flattened keys, not a prompt apart.
    inputs = padded_chat_inputs()
    reference, flash = tiny_model(seed=2), flash_path_on_cpu(tiny_model(seed=2))
    reference.set_attn_implementation("eager")
    length = inputs["input_ids"].shape[1]
    cache = StaticCache(config=flash.config, max_cache_len=length + 7)
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = flash(**inputs, **cache_kwargs(cache), use_cache=True).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)
    flash_path_on_cpu.assert_packed(flash, int(valid.sum()))
    key_buffer = cache.layers[0].keys
    assert key_buffer.shape[2] == length + 7 and key_buffer.shape[0] == 2  # the longer buffer was in play, batched


def test_flex_attention_matches_eager(monkeypatch):
    """flex attention gets the mixed mask as a BlockMask (the first call compiles flex_attention, ~40 s on CPU)."""
    inputs = padded_chat_inputs()
    reference, flex = tiny_model(seed=4), tiny_model(seed=4)
    reference.set_attn_implementation("eager")
    flex.set_attn_implementation("flex_attention")
    assert flex.model.visual.config._attn_implementation == "flex_attention"
    flex_blocks = spy_calls(monkeypatch, text_decoder, "attend_flex_blocks")
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = flex(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)
    # every layer of the prompt (image blocks) went through flex with the chunk's BlockMask
    assert len(flex_blocks) == flex.config.text_config.num_hidden_layers
    assert all(isinstance(call.args[3].block_mask, BlockMask) for call in flex_blocks)


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


@pytest.mark.parametrize("grouped_kernel", [True, False], ids=["grouped-heads-kernel", "repeated-heads"])
@pytest.mark.parametrize("past_length", [0, 5])
def test_query_slices_equal_the_dense_mask(grouped_kernel, past_length, monkeypatch):
    # sdpa's path by query slices (block_attention.py), slices of 4 queries here, with left padding; the key/value
    # heads are either grouped by the kernel (the CPU) or repeated once for every slice (CUDA's masked kernels)
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, dim = 2, 4, 2, 12, 16
    kv_len = past_length + q_len
    query = torch.randn(batch, heads, q_len, dim)
    key, value = torch.randn(batch, kv_heads, kv_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    blocks = torch.full((batch, q_len), TEXT_BLOCK_ID)
    blocks[0, 2:6], blocks[0, 6:9], blocks[1, 4:11] = 0, 1, 0
    attention_mask = torch.ones(batch, kv_len, dtype=torch.long)
    attention_mask[1, :3] = 0
    expected = dense_reference(query, key, value, attention_mask, blocks, past_length, dim**-0.5)

    monkeypatch.setattr(block_attention, "QUERY_CHUNK", 4)
    monkeypatch.setattr(block_attention, "groups_heads_under_a_mask", lambda device: grouped_kernel)
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(query, key, value, **kwargs):
        calls.append((key.shape[1], key.data_ptr(), kwargs["enable_gqa"]))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    layout = prefix_layout(past_length, attention_mask, blocks)
    actual = attend_query_chunks(query, key, value, layout, scaling=dim**-0.5)
    valid = attention_mask[:, past_length:].bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert len(calls) == 3  # 12 queries in slices of 4
    expected_call = (kv_heads, True) if grouped_kernel else (heads, False)  # (key heads seen, enable_gqa)
    assert {(heads_seen, gqa) for heads_seen, _, gqa in calls} == {expected_call}
    assert len({pointer for _, pointer, _ in calls}) == 1  # the same keys for every slice: repeated at most once
