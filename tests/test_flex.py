"""flex_attention never falls back: a dozen prompt layouts in one process (views, prefixes, padding, batch sizes)
stay under dynamo's recompile limit, which is made to raise here instead of silently running flex uncompiled (the
dense fallback: 80 GiB at 16 views on a GPU), every chunk with image blocks goes through the compiled flex call (not
the package's own fallback to sdpa by query slices, which equals eager too), and every output equals eager. The
BlockMask of chunks of many blocks of 128 tokens (the tiny prompts fit in one) is checked against the prefix rule
block by block, and the padded lengths against their bound."""

from __future__ import annotations

import torch
import torch._dynamo
from conftest import geometry_block, tiny_model
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_model import GRID_H, GRID_W
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.nn.attention.flex_attention import BlockMask

from g2vlm_hf.modeling import text_decoder
from g2vlm_hf.modeling.block_attention import attend_query_chunks, prefix_layout
from g2vlm_hf.modeling.flex import (
    FLEX_BLOCK,
    FlexBlocks,
    _flex_call,
    attend_flex_blocks,
    flex_length,
    prefix_block_mask,
)
from g2vlm_hf.modeling.token_layout import TEXT_BLOCK_ID

SHAPES = [  # (views, text tokens before the views, left padding of a second row or None)
    (2, 2, None), (3, 2, None), (2, 5, 2), (4, 3, 3), (5, 2, None), (6, 4, 1),
    (7, 2, None), (3, 6, 4), (8, 3, None), (9, 2, 2), (2, 9, None), (10, 3, 3),
]  # fmt: skip


def layout_inputs(views: int, prefix: int, padding: int | None) -> dict:
    ids = [1] * prefix + geometry_block(views, GRID_H, GRID_W) + [8, 9]
    rows = [ids] if padding is None else [ids, [0] * padding + ids[padding:]]
    generator = torch.Generator().manual_seed(views * 10 + prefix)
    scenes = torch.randn(len(rows), views, 3, GRID_H * 14, GRID_W * 14, generator=generator)
    mask = torch.tensor([[int(token != 0) for token in row] for row in rows])
    return dict(input_ids=torch.tensor(rows), attention_mask=mask, geometry_pixel_values=scenes)


@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_a_dozen_prompt_shapes_stay_compiled_and_equal_eager(monkeypatch):
    torch._dynamo.reset()
    fell_back = []
    query_chunks = text_decoder.attend_query_chunks

    def spy(*args, **kwargs):
        fell_back.append(1)
        return query_chunks(*args, **kwargs)

    monkeypatch.setattr(text_decoder, "attend_query_chunks", spy)
    flex, reference = tiny_model(seed=3), tiny_model(seed=3)
    flex.set_attn_implementation("flex_attention")
    reference.set_attn_implementation("eager")
    buckets = set()  # (batch size, padded length): a graph of the package's flex call each at most
    for shape in SHAPES:
        inputs = layout_inputs(*shape)
        buckets.add((inputs["input_ids"].shape[0], flex_length(inputs["input_ids"].shape[1])))
        with torch.no_grad():
            actual, expected = flex.reconstruct(**inputs), reference.reconstruct(**inputs)
        torch.testing.assert_close(actual.world_points, expected.world_points, rtol=1e-4, atol=1e-4)
    assert fell_back == [], "flex fell back to sdpa by query slices"
    # the graphs compiled for the package's own flex call (none if it ran uncompiled), apart from any other graph
    graphs = len(_debug_get_cache_entry_list(_flex_call.__code__))
    assert 1 <= graphs <= len(buckets), f"{graphs} graphs of the flex call for {len(SHAPES)} shapes"


def test_padded_lengths_are_multiples_of_the_block_within_a_quarter_and_few():
    lengths = torch.arange(1, 131_073)
    padded = torch.tensor([flex_length(int(length)) for length in lengths])
    assert (padded >= lengths).all() and (padded % FLEX_BLOCK == 0).all()
    padding = padded - lengths
    assert ((padding < FLEX_BLOCK) | (padding * 4 < lengths)).all()  # under a block or under a quarter
    assert (padding[lengths >= 512] * 4 < lengths[lengths >= 512]).all()
    assert len(set(padded.tolist())) == 36  # graphs of the flex call per batch size and dtype, up to 128k tokens


@st.composite
def chunk_layouts(draw):
    """A chunk of queries after some cached tokens: rows of causal text and bidirectional blocks spanning several
    blocks of 128 tokens, the second row left-padded or not."""
    batch = draw(st.integers(min_value=1, max_value=2))
    past_length = draw(st.integers(min_value=0, max_value=300))
    q_len = draw(st.integers(min_value=1, max_value=450))
    block_ids = torch.full((batch, q_len), TEXT_BLOCK_ID)
    for row in range(batch):
        cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=q_len), min_size=0, max_size=8)))
        for block, (start, stop) in enumerate(zip(cuts[::2], cuts[1::2])):
            block_ids[row, start:stop] = block
    attention_mask = None
    padding = draw(st.integers(min_value=0, max_value=past_length + q_len - 1)) if batch == 2 else 0
    if padding:
        attention_mask = torch.ones(batch, past_length + q_len, dtype=torch.long)
        attention_mask[1, :padding] = 0
        block_ids[1, : max(padding - past_length, 0)] = TEXT_BLOCK_ID  # the padding itself is no image
    return past_length, attention_mask, block_ids


def block_classes(mask: BlockMask) -> torch.Tensor:
    """`(batch, q_blocks, kv_blocks)`: 0 for a block the kernel skips, 1 where it applies `mask_mod`, 2 where it
    attends every element."""
    batch, _, q_blocks = mask.kv_num_blocks.shape
    classes = torch.zeros(batch, q_blocks, mask.kv_indices.shape[-1], dtype=torch.long)
    listings = ((1, mask.kv_num_blocks, mask.kv_indices), (2, mask.full_kv_num_blocks, mask.full_kv_indices))
    for value, counts, indices in listings:
        for row in range(batch):
            for q_block in range(q_blocks):
                listed = indices[row, 0, q_block, : counts[row, 0, q_block]].long()
                assert (classes[row, q_block, listed] == 0).all(), "a block listed twice"
                classes[row, q_block, listed] = value
    return classes


@settings(max_examples=60, deadline=None)
@given(chunk_layouts())
@example((127, None, torch.full((1, 200), TEXT_BLOCK_ID)))  # the first queries' nearest key ends the first key block
@example((126, None, torch.full((1, 200), TEXT_BLOCK_ID)))  # one short of it
def test_the_block_mask_follows_the_prefix_rule_block_by_block(chunk):
    past_length, attention_mask, block_ids = chunk
    batch, q_len = block_ids.shape
    kv_len = past_length + q_len
    q_padded, kv_padded = flex_length(q_len), flex_length(kv_len)
    layout = prefix_layout(past_length, attention_mask, block_ids)
    mask = prefix_block_mask(layout, q_padded, kv_padded)
    assert mask.seq_lengths == (q_padded, kv_padded)

    # the rule, written out: a real query sees the real keys up to its last one, a padded query its own key only;
    # the queries and keys added by the padding to flex lengths see and are seen by nothing
    last = layout.last_key
    keys = torch.arange(kv_padded)
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    key_valid = torch.nn.functional.pad(key_valid, (0, kv_padded - kv_len), value=False)
    query_valid = key_valid[:, past_length:kv_len]
    own = torch.arange(past_length, kv_len)
    sees = (keys <= last[..., None]) & key_valid[:, None, :]
    sees = torch.where(query_valid[..., None], sees, keys == own[:, None])
    rule = torch.nn.functional.pad(sees, (0, 0, 0, q_padded - q_len), value=False)

    # mask_mod, applied in the partial blocks, is the rule everywhere
    rows, queries = torch.arange(batch)[:, None, None], torch.arange(q_padded)[None, :, None]
    assert torch.equal(mask.mask_mod(rows, 0, queries, keys[None, None, :]), rule)
    # the blocks the kernel attends whole are whole in the rule, those it skips empty
    blocks = rule.view(batch, q_padded // FLEX_BLOCK, FLEX_BLOCK, kv_padded // FLEX_BLOCK, FLEX_BLOCK)
    whole, touched = blocks.all(-1).all(-2), blocks.any(-1).any(-2)
    classes = block_classes(mask)
    assert whole[classes == 2].all() and not touched[classes == 0].any()
    if attention_mask is None:  # without padding the classification is exact: no block needlessly partial
        assert torch.equal(classes, torch.where(whole, 2, torch.where(touched, 1, 0)))


def test_query_heads_that_are_not_a_power_of_two_get_their_key_heads_repeated():
    # The full-size text model has 12 query heads over 2 key/value heads; flex's grouped-query kernels want a power
    # of two, so those keys are repeated instead (the tiny config, 4 over 2, takes the grouped path). Against sdpa by
    # query slices on a padded chunk of two blocks of 128 tokens.
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, q_len, dim = 2, 12, 2, 150, 16
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, q_len, dim, generator=generator) for _ in range(2))
    block_ids = torch.full((batch, q_len), TEXT_BLOCK_ID)
    block_ids[0, 10:90], block_ids[1, 60:140] = 0, 0
    attention_mask = torch.ones(batch, q_len, dtype=torch.long)
    attention_mask[1, :5] = 0
    layout = prefix_layout(0, attention_mask, block_ids)
    expected = attend_query_chunks(query, key, value, layout, scaling=dim**-0.5)
    actual = attend_flex_blocks(query, key, value, FlexBlocks(layout), dim**-0.5)
    valid = attention_mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-4, atol=1e-5)
