"""Multimodal RoPE positions and attention blocks of hand-written prompts, checked against the rules of the official
code (data/data_utils.py get_rope_index_image_3D*, g2vlm.py prepare_*_images)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from g2vlm_hf.modeling.token_layout import (
    TEXT_BLOCK_ID,
    block_last_index,
    check_placeholders_are_wrapped,
    get_block_ids,
    get_rope_index,
)

IMG, GEO, START, END = 90, 91, 92, 93
LAYOUT = dict(image_token_id=IMG, geometry_token_id=GEO, spatial_merge_size=2)
BLOCKS = dict(image_token_id=IMG, geometry_token_id=GEO, vision_start_token_id=START, vision_end_token_id=END)


def test_image_positions_follow_the_official_rule():
    # text, text, <start>, 2x3 merged image tokens (grid 4x6 before merging), <end>, text
    ids = torch.tensor([[5, 6, START, *[IMG] * 6, END, 7]])
    positions, deltas = get_rope_index(ids, torch.tensor([[1, 4, 6]]), None, None, **LAYOUT)
    start = 2
    expected_t = [0, 1, 2] + [start + 1] * 6 + [start + 1 + 3, start + 1 + 3 + 1]
    expected_h = [0, 1, 2] + [start + 1 + h for h in (0, 0, 0, 1, 1, 1)] + [6, 7]
    expected_w = [0, 1, 2] + [start + 1 + w for w in (0, 1, 2, 0, 1, 2)] + [6, 7]
    assert positions[:, 0].tolist() == [expected_t, expected_h, expected_w]
    # the next token after the prompt (sequence index 11) gets position 8
    assert deltas.tolist() == [[8 - 11]]


def test_each_geometry_view_restarts_after_the_previous_end_marker():
    ids = torch.tensor([[5, START, *[GEO] * 4, END, START, *[GEO] * 4, END]])
    grids = torch.tensor([[1, 2, 2], [1, 2, 2]])
    positions, _ = get_rope_index(ids, None, grids, None, **LAYOUT)
    # view 1: start at 1, tokens from 2, end at 1 + 1 + max(1, 2, 2) = 4; view 2 starts at 5
    assert positions[0, 0].tolist() == [0, 1, 2, 2, 2, 2, 4, 5, 6, 6, 6, 6, 8]
    assert positions[1, 0].tolist() == [0, 1, 2, 2, 3, 3, 4, 5, 6, 6, 7, 7, 8]


def test_left_padding_gets_no_position_and_rows_are_independent():
    ids = torch.tensor([[0, 0, 5, START, GEO, GEO, END], [5, 6, 7, START, GEO, GEO, END]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    grids = torch.tensor([[1, 1, 2], [1, 1, 2]])
    positions, deltas = get_rope_index(ids, None, grids, mask, **LAYOUT)
    assert positions[0, 0].tolist() == [1, 1, 0, 1, 2, 2, 4]
    assert positions[2, 1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert deltas.view(-1).tolist() == [5 - 7, 7 - 7]


def test_continuation_after_a_cache_starts_from_the_given_position():
    ids = torch.tensor([[START, GEO, GEO, END, 5]])
    positions, deltas = get_rope_index(
        ids, None, torch.tensor([[1, 1, 2]]), None, start_positions=torch.tensor([10]), past_length=8, **LAYOUT
    )
    assert positions[2, 0].tolist() == [10, 11, 12, 13, 14]
    assert deltas.tolist() == [[15 - (8 + 5)]]


def test_views_of_a_scene_share_one_block_and_images_get_their_own():
    ids = torch.tensor([[5, START, GEO, END, START, GEO, END, 6, START, IMG, END, START, IMG, END, 7]])
    blocks = get_block_ids(ids, None, **BLOCKS)
    assert blocks[0].tolist() == [-1, 0, 0, 0, 0, 0, 0, -1, 1, 1, 1, 2, 2, 2, -1]


def test_no_media_means_no_blocks():
    no_media = dict(BLOCKS, image_token_id=None, geometry_token_id=None)
    assert get_block_ids(torch.tensor([[5, START, IMG, END]]), None, **no_media) is None
    # with media given, a chunk without placeholders is all causal text
    assert get_block_ids(torch.tensor([[5, 6, 7]]), None, **BLOCKS).tolist() == [[-1, -1, -1]]


@pytest.mark.parametrize(
    "ids, grids, message",
    [
        ([5, START, GEO, GEO, GEO, END], [[1, 1, 2]], "does not match the features"),
        ([5, START, GEO, GEO, END], [[1, 1, 2], [1, 1, 2]], "placeholders for 1"),
        ([5, START, GEO, GEO, END, START, GEO, GEO, END], [[1, 1, 2]], "more geometry placeholder tokens"),
    ],
)
def test_placeholders_and_grids_must_agree(ids, grids, message):
    with pytest.raises(ValueError, match=message):
        get_rope_index(torch.tensor([ids]), None, torch.tensor(grids), None, **LAYOUT)


WRAPPED = "must sit directly between <|vision_start|> and <|vision_end|>"


@pytest.mark.parametrize(
    "ids",
    [
        [5, GEO, GEO, END, 6],  # no start marker
        [5, START, IMG, IMG, 6],  # no end marker
        [START, GEO, GEO],  # the row ends inside the view
        [5, START, IMG, IMG, GEO, GEO, END],  # an image's placeholders run straight into a view's
        [5, START, GEO, END, GEO, END],  # the second view lost its start marker
        [5, START, GEO, END, 6, IMG, 7],  # a stray image placeholder in the text
    ],
)
def test_placeholders_outside_their_markers_are_refused(ids):
    """Layouts the processor never builds have no defined attention block: refused, not guessed."""
    with pytest.raises(ValueError, match=re.escape(WRAPPED)):
        check_placeholders_are_wrapped(torch.tensor([ids]), None, **BLOCKS)


def test_wrapped_placeholders_padding_and_media_not_given_pass():
    # two views of a scene, an image, and two images back to back in one wrapped run (told apart by their grids)
    row = [5, START, GEO, END, START, GEO, END, 6, START, IMG, END, START, IMG, IMG, IMG, END]
    check_placeholders_are_wrapped(torch.tensor([row]), None, **BLOCKS)
    # padding that holds placeholder ids is not part of the prompt
    ids = torch.tensor([[IMG, GEO, 5, START, GEO, END], [5, START, GEO, END, GEO, IMG]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    check_placeholders_are_wrapped(ids, mask, **BLOCKS)
    # placeholder ids of media that do not come with the call are ordinary tokens (after a cache)
    check_placeholders_are_wrapped(torch.tensor([[5, IMG, 6]]), None, **dict(BLOCKS, image_token_id=None))
    with pytest.raises(ValueError, match=re.escape(WRAPPED)):
        check_placeholders_are_wrapped(ids, torch.ones_like(mask), **BLOCKS)


def test_a_batch_gets_the_positions_of_its_rows_laid_out_alone():
    # images are matched to placeholders in prompt order across the batch: row 0 holds one image and two views,
    # row 1 (left-padded) two images back to back of different sizes and one view
    row0 = [5, START, *[IMG] * 6, END, START, GEO, GEO, END, START, GEO, GEO, END, 6]
    row1 = [7, START, *[IMG] * 2, *[IMG] * 4, END, 8, START, *[GEO] * 4, END]
    image_grids = [[[1, 4, 6]], [[1, 2, 4], [2, 2, 4]]]
    view_grids = [[[1, 1, 2], [1, 1, 2]], [[1, 2, 2]]]
    width = max(len(row0), len(row1))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in (row0, row1)])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in (row0, row1)])
    positions, deltas = get_rope_index(
        ids,
        torch.cat([torch.tensor(g) for g in image_grids]),
        torch.cat([torch.tensor(g) for g in view_grids]),
        mask,
        **LAYOUT,
    )
    for index, row in enumerate((row0, row1)):
        alone, alone_deltas = get_rope_index(
            torch.tensor([row]), torch.tensor(image_grids[index]), torch.tensor(view_grids[index]), None, **LAYOUT
        )
        assert torch.equal(positions[:, index, width - len(row) :], alone[:, 0])
        assert deltas[index, 0] == alone_deltas[0, 0] - (width - len(row))  # same next position, later index
    # the second image of row 1 starts where the first one's extent (max(1, 1, 2) = 2) leaves off
    assert positions[:, 1, width - len(row1) + 4].tolist() == [2 + 2, 2 + 2, 2 + 2]


# --- the attention blocks as a property: random prompts whose layout is known by construction ---------------------

SEGMENTS = st.lists(
    st.tuples(st.sampled_from(["text", "image", "geometry"]), st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=7,
)


@st.composite
def padded_batches(draw) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Rows of random text, images and geometry views (each placeholder run between its markers), padded on either end
    to one width with id 0, and the block each token belongs to as the rule says: an image with its markers is a
    block, views that directly follow each other are one block (a scene), text and padding are -1."""
    rows, blocks = [], []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        ids, row_blocks, count, previous = [], [], 0, None
        for kind, length in draw(SEGMENTS):
            if kind == "text":
                ids += draw(st.lists(st.integers(min_value=1, max_value=9), min_size=length, max_size=length))
                row_blocks += [TEXT_BLOCK_ID] * length
            else:
                count += 0 if kind == previous == "geometry" else 1
                ids += [START, *[IMG if kind == "image" else GEO] * length, END]
                row_blocks += [count - 1] * (length + 2)
            previous = kind
        rows.append(ids)
        blocks.append(row_blocks)
    width = max(len(ids) for ids in rows) + draw(st.integers(min_value=0, max_value=2))
    left = draw(st.booleans())  # the processor pads on one side for the whole batch
    batch_ids, batch_mask, batch_blocks = [], [], []
    for ids, row_blocks in zip(rows, blocks):
        pad = width - len(ids)
        batch_ids.append([0] * pad + ids if left else ids + [0] * pad)
        batch_mask.append([0] * pad + [1] * len(ids) if left else [1] * len(ids) + [0] * pad)
        batch_blocks.append([TEXT_BLOCK_ID] * pad + row_blocks if left else row_blocks + [TEXT_BLOCK_ID] * pad)
    return batch_ids, batch_mask, batch_blocks


@settings(max_examples=300, deadline=None)
@given(padded_batches())
def test_blocks_and_their_last_keys_follow_the_rule_for_any_layout(batch):
    ids, mask, expected = batch
    blocks = get_block_ids(torch.tensor(ids), torch.tensor(mask), **BLOCKS)
    assert blocks.tolist() == expected
    # each token attends up to itself (text, padding) or to the last token of its block
    last = block_last_index(blocks).tolist()
    for row, row_blocks in zip(last, expected):
        for index, block in enumerate(row_blocks):
            ends = [i for i, other in enumerate(row_blocks) if other == block] if block != TEXT_BLOCK_ID else [index]
            assert row[index] == max(ends), (index, row_blocks)
