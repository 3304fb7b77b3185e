"""Multimodal RoPE positions and attention blocks of hand-written prompts, checked against the rules of the official
code (data/data_utils.py get_rope_index_image_3D*, g2vlm.py prepare_*_images)."""

from __future__ import annotations

import pytest
import torch

from g2vlm_hf.modeling.token_layout import get_block_ids, get_rope_index

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
