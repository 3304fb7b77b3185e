"""What a mutation pass over token_layout.py and block_attention.py found unpinned: multimodal RoPE positions against
transformers' Qwen2-VL, padding that holds any id, and sdpa's query slices against a dense masked attention written
here, at any slice size, scaling, grouping of the key heads and dropout."""

from __future__ import annotations

import re
import types

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from g2vlm_hf.modeling import block_attention
from g2vlm_hf.modeling.block_attention import attend_query_chunks, prefix_layout
from g2vlm_hf.modeling.token_layout import TEXT_BLOCK_ID, get_block_ids, get_rope_index

IMG, GEO, START, END = 90, 91, 92, 93
LAYOUT = dict(image_token_id=IMG, geometry_token_id=GEO, spatial_merge_size=2)
BLOCKS = dict(image_token_id=IMG, geometry_token_id=GEO, vision_start_token_id=START, vision_end_token_id=END)


# --- RoPE positions of semantic images, against transformers' Qwen2-VL -----------------------------------------------


def qwen2_vl_rope_index(ids: torch.Tensor, grids: torch.Tensor, mask: torch.Tensor, merge: int):
    """transformers' Qwen2-VL `get_rope_index` (it reads only the merge size from its model and its own helper)."""
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=merge)),
        get_vision_position_ids=lambda *args, **kwargs: Qwen2VLModel.get_vision_position_ids(None, *args, **kwargs),
    )
    token_types = (ids == IMG).int()
    return Qwen2VLModel.get_rope_index(model, ids, token_types, image_grid_thw=grids, attention_mask=mask)


def padded(rows: list[list[int]], left: bool, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` padded with `pad_id` to one width on one side, and their attention mask."""
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        pad = width - len(row)
        ids.append([pad_id] * pad + row if left else row + [pad_id] * pad)
        mask.append([0] * pad + [1] * len(row) if left else [1] * len(row) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


# semantic images each between their own markers (Qwen2-VL tells the images of one run of placeholders apart by
# nothing but their order, so it needs text or markers between them); grids before merging by 2, five images in all
QWEN_ROWS = [
    [5, START, *[IMG] * 6, END, 6, START, *[IMG] * 3, END, 7],
    [8, START, *[IMG] * 2, END, 9, START, *[IMG] * 12, END, START, *[IMG] * 4, END, 4],
]
QWEN_GRIDS = torch.tensor([[1, 4, 6], [1, 6, 2], [1, 2, 4], [1, 6, 8], [1, 4, 4]])


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_image_positions_and_deltas_equal_transformers_qwen2_vl(left):
    """Every valid token's (t, h, w) position equals transformers' Qwen2-VL `get_rope_index` for a padded batch of
    images of several sizes and shapes, five in all (text after an image continues from the image's largest position
    + 1; an image's extent is its largest side, tall or wide), the positions are integers, and the deltas give the
    next token's position at its sequence index (padding included, as `generate()` counts it) where Qwen2-VL's count
    the valid tokens alone."""
    ids, mask = padded(QWEN_ROWS, left)
    expected, expected_deltas = qwen2_vl_rope_index(ids, QWEN_GRIDS, mask, merge=2)
    positions, deltas = get_rope_index(ids, QWEN_GRIDS, None, mask, **LAYOUT)
    assert positions.dtype == deltas.dtype == torch.long
    valid = mask.bool()
    assert torch.equal(positions[:, valid], expected[:, valid])
    padding = mask.shape[1] - mask.sum(1)
    assert torch.equal(deltas.view(-1), expected_deltas.view(-1) - padding)


def test_text_positions_are_integers_without_any_image():
    """A prompt without a placeholder of either kind still gets integer positions 0, 1, 2, ... (and integer deltas),
    also when continuing from given start positions."""
    ids = torch.tensor([[5, 6, 7]])
    positions, deltas = get_rope_index(ids, None, None, None, **LAYOUT)
    assert positions.dtype == deltas.dtype == torch.long
    assert positions.tolist() == [[[0, 1, 2]]] * 3 and deltas.tolist() == [[0]]
    positions, deltas = get_rope_index(
        ids, None, None, None, start_positions=torch.tensor([4]), past_length=2, **LAYOUT
    )
    assert positions.dtype == deltas.dtype == torch.long
    assert positions.tolist() == [[[4, 5, 6]]] * 3 and deltas.tolist() == [[4 + 3 - (2 + 3)]]


def test_too_many_images_are_counted_in_the_error():
    """Three views for a prompt with placeholders for one: the error says how many images its placeholders hold."""
    ids = torch.tensor([[5, START, GEO, GEO, END]])
    with pytest.raises(
        ValueError, match=re.escape("3 geometry image(s) were given but the prompt has placeholders for 1:")
    ):
        get_rope_index(ids, None, torch.tensor([[1, 1, 2]] * 3), None, **LAYOUT)


# --- padding holds whatever id: the attention mask alone says what is padding -----------------------------------------

PADDING_ROWS = [
    [5, START, *[GEO] * 4, END, START, *[GEO] * 4, END, 6],
    [7, START, *[IMG] * 2, END, 8],
]
PADDING_GEOMETRY = torch.tensor([[1, 2, 2], [1, 2, 2]])
PADDING_IMAGES = torch.tensor([[1, 2, 4]])


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
@pytest.mark.parametrize("pad_id", [IMG, GEO, START, END])
def test_padding_holding_a_placeholder_or_marker_id_changes_nothing(pad_id, left):
    """Padding that holds a placeholder or marker id (the id of padding is the caller's choice) is no placeholder:
    the rows get the blocks and positions they get with padding id 0, and padding belongs to no block."""
    reference_ids, mask = padded(PADDING_ROWS, left)
    ids, _ = padded(PADDING_ROWS, left, pad_id=pad_id)
    valid = mask.bool()
    expected_blocks = get_block_ids(reference_ids, mask, **BLOCKS)
    blocks = get_block_ids(ids, mask, **BLOCKS)
    assert torch.equal(blocks, expected_blocks)
    assert (blocks[~valid] == TEXT_BLOCK_ID).all()
    expected, expected_deltas = get_rope_index(reference_ids, PADDING_IMAGES, PADDING_GEOMETRY, mask, **LAYOUT)
    positions, deltas = get_rope_index(ids, PADDING_IMAGES, PADDING_GEOMETRY, mask, **LAYOUT)
    assert torch.equal(positions[:, valid], expected[:, valid]) and torch.equal(deltas, expected_deltas)


# --- markers that wrap no placeholders are text --------------------------------------------------------------------


def test_vision_markers_that_wrap_no_placeholders_are_causal_text():
    """A `<|vision_start|>` not followed by placeholders, or a `<|vision_end|>` not preceded by them (typed in the
    text, or a start marker at the end of a chunk), is causal text like any other token: only markers around
    placeholders join their image's block."""
    ids = torch.tensor([[START, 5, END, START, GEO, GEO, END, END, 6, START, START, IMG, END, START]])
    blocks = get_block_ids(ids, None, **BLOCKS)
    assert blocks[0].tolist() == [-1, -1, -1, 0, 0, 0, 0, -1, -1, -1, 1, 1, 1, -1]


# --- sdpa by query slices against a dense masked attention written here ---------------------------------------------


def dense_masked_attention(query, key, value, block_rows, key_mask, past_length, scaling):
    """Attention written out query by query: query i of a row (absolute index past + i) sees the valid keys up to
    itself if it is text, up to the last token of its block otherwise; `(batch, q_len, heads, dim)`, NaN on rows of
    padded queries (the caller drops them)."""
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    output = torch.full((batch, q_len, heads, dim), float("nan"), dtype=torch.float64)
    for row in range(batch):
        for i, block in enumerate(block_rows[row]):
            if not key_mask[row][past_length + i]:
                continue
            last = max(j for j, other in enumerate(block_rows[row]) if other == block) if block >= 0 else i
            seen = [k for k in range(past_length + last + 1) if key_mask[row][k]]
            for head in range(heads):
                keys = key[row, head // groups, seen].double()
                weights = (keys @ query[row, head, i].double() * scaling).softmax(0)
                output[row, i, head] = weights @ value[row, head // groups, seen].double()
    return output


def query_chunk_case(past_length: int, extra_slots: int, padded: bool = True, heads: int = 6, kv_heads: int = 3):
    """A batch of two rows with blocks of several sizes and text between them, the second left-padded (in the cached
    part too) unless not `padded`, and `extra_slots` unused key slots after the last key (a static cache's buffer),
    all random; two query heads per key head by default (a batch of two: a head count unlike the batch size)."""
    generator = torch.Generator().manual_seed(past_length * 10 + extra_slots)
    block_rows = [
        [-1, 0, 0, 0, -1, -1, 1, 1, 1, 1, 1, -1, 2, 2],
        [-1, -1, -1, -1, 0, 0, -1, 1, 1, 1, -1, -1, -1, -1],
    ]
    q_len, keys = len(block_rows[0]), past_length + len(block_rows[0])
    key_mask = [[1] * keys, [0] * (past_length + 3) + [1] * (q_len - 3) if padded else [1] * keys]
    query = torch.randn(2, heads, q_len, 8, generator=generator)
    key = torch.randn(2, kv_heads, keys + extra_slots, 8, generator=generator)
    value = torch.randn(2, kv_heads, keys + extra_slots, 8, generator=generator)
    return query, key, value, block_rows, key_mask


@pytest.mark.parametrize("grouped_kernel", [True, False], ids=["grouped-heads", "repeated-heads"])
@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 512])
@pytest.mark.parametrize(
    ("past_length", "extra_slots", "padded"), [(0, 0, False), (0, 0, True), (4, 0, True), (4, 3, True)]
)
def test_query_slices_at_any_size_equal_one_dense_masked_attention(
    chunk, past_length, extra_slots, padded, grouped_kernel, monkeypatch
):
    """Whatever QUERY_CHUNK cuts the queries into (slices ending inside a block, one query each, two slices, one
    slice for all), with or without padding (no padding mask at all), after a cache or not, with unused slots after
    the keys, at a scaling that is not sdpa's default, with two query heads per key head grouped by the kernel (the
    CPU) or repeated (CUDA): each valid query's output is the dense masked attention of the rule (text sees up to
    itself, a block up to its last token, padding never), and no output is NaN."""
    monkeypatch.setattr(block_attention, "QUERY_CHUNK", chunk)
    monkeypatch.setattr(block_attention, "groups_heads_under_a_mask", lambda device: grouped_kernel)
    query, key, value, block_rows, key_mask = query_chunk_case(past_length, extra_slots, padded)
    layout = prefix_layout(past_length, torch.tensor(key_mask) if padded else None, torch.tensor(block_rows))
    actual = attend_query_chunks(query, key, value, layout, scaling=0.3)
    expected = dense_masked_attention(query, key, value, block_rows, key_mask, past_length, 0.3)
    valid = torch.tensor(key_mask)[:, past_length:].bool()
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual[valid].double(), expected[valid], rtol=1e-5, atol=1e-5)
    # padded queries' outputs are dropped by the caller, but a NaN there would reach every query of the next layer
    assert torch.isfinite(actual).all()


def test_padded_keys_and_unused_slots_never_reach_a_valid_query():
    """Changing the keys and values of padding (cached or not) and of unused slots after the keys changes no
    valid query's output."""
    past_length = 4
    query, key, value, block_rows, key_mask = query_chunk_case(past_length, extra_slots=3)
    layout = prefix_layout(past_length, torch.tensor(key_mask), torch.tensor(block_rows))
    unseen = ~torch.tensor(key_mask).bool()
    unseen = torch.nn.functional.pad(unseen, (0, 3), value=True)[:, None, :, None]
    other_key = torch.where(unseen, key * 5 + 1, key)
    other_value = torch.where(unseen, value * 5 - 1, value)
    valid = torch.tensor(key_mask)[:, past_length:].bool()
    expected = attend_query_chunks(query, key, value, layout, scaling=0.3)
    actual = attend_query_chunks(query, other_key, other_value, layout, scaling=0.3)
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("past_length", [0, 4])
def test_a_padded_query_sees_its_own_key_alone(past_length):
    """A padded query (its output dropped by the caller) attends to its own key and nothing else, so its row of the
    mask is never empty: its output is its own value, whatever sdpa makes of a row with nothing to see."""
    query, key, value, block_rows, key_mask = query_chunk_case(past_length, extra_slots=0)
    layout = prefix_layout(past_length, torch.tensor(key_mask), torch.tensor(block_rows))
    output = attend_query_chunks(query, key, value, layout, scaling=0.3)
    padded_queries = [i for i in range(output.shape[1]) if not key_mask[1][past_length + i]]
    assert padded_queries == [0, 1, 2]
    own_values = value[1, :, past_length : past_length + 3].transpose(0, 1).repeat_interleave(2, dim=1)
    torch.testing.assert_close(output[1, padded_queries], own_values)


def test_dropout_reaches_the_attention_weights_and_is_off_by_default():
    """The dropout given (a training step's attention dropout) is applied by sdpa; without it the slices are
    deterministic."""
    query, key, value, block_rows, key_mask = query_chunk_case(0, 0)
    layout = prefix_layout(0, torch.tensor(key_mask), torch.tensor(block_rows))
    plain = attend_query_chunks(query, key, value, layout, scaling=0.3)
    assert torch.equal(plain, attend_query_chunks(query, key, value, layout, scaling=0.3))
    torch.manual_seed(0)
    dropped = attend_query_chunks(query, key, value, layout, scaling=0.3, dropout=0.5)
    valid = torch.tensor(key_mask).bool()
    assert not torch.allclose(dropped[valid], plain[valid])


def test_the_cpu_kernel_groups_the_key_heads_and_cuda_gets_them_repeated():
    """On the CPU sdpa's masked kernel takes grouped key/value heads (`enable_gqa`); CUDA's masked kernels do not
    (they would fall back to unfused math), so there the heads are repeated."""
    assert block_attention.groups_heads_under_a_mask(torch.device("cpu"))
    assert not block_attention.groups_heads_under_a_mask(torch.device("cuda"))


def test_as_many_key_heads_as_query_heads_go_to_sdpa_ungrouped(monkeypatch):
    """Without grouped-query attention sdpa gets the keys as they are and no `enable_gqa` (which would send CUDA's
    masked kernels to the unfused math), on every device."""
    query, key, value, block_rows, key_mask = query_chunk_case(0, 0, heads=3, kv_heads=3)
    layout = prefix_layout(0, torch.tensor(key_mask), torch.tensor(block_rows))
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(query, key, value, **kwargs):
        calls.append((key.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for grouped_kernel in (True, False):
        monkeypatch.setattr(
            block_attention, "groups_heads_under_a_mask", lambda device, grouped=grouped_kernel: grouped
        )
        attend_query_chunks(query, key, value, layout, scaling=0.3)
    assert set(calls) == {(3, False)}
