"""Where the images sit in a G²VLM prompt: multimodal RoPE positions and bidirectional attention blocks.

A semantic image is `<|vision_start|>` + `<|image_pad|>` * (t * h * w / merge**2) + `<|vision_end|>`; a geometry view
is `<|vision_start|>` + `<|geo_pad|>` * (h * w) + `<|vision_end|>`. For an image starting at position p, the start
marker gets p, its tokens get (p + 1 + t, p + 1 + h, p + 1 + w) over their grid, the end marker gets
p + 1 + max(t_len, h_len, w_len), and the next token continues from there. Each image (markers included) is one
bidirectional attention block; consecutive geometry views (one scene) merge into ONE block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.utils import torch_compilable_check

TEXT_BLOCK_ID = -1


def shifted(values: torch.Tensor, step: int) -> torch.Tensor:
    """`values[:, i - step]` at each i of `(batch, seq)` values (zero / False where that falls outside the row)."""
    return F.pad(values, (step, 0))[:, :-step] if step > 0 else F.pad(values, (0, -step))[:, -step:]


def get_rope_index(
    input_ids: torch.LongTensor,
    image_grid_thw: torch.LongTensor | None,
    geometry_grid_thw: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int,
    geometry_token_id: int,
    spatial_merge_size: int,
    start_positions: torch.LongTensor | None = None,
    past_length: int = 0,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """3D (temporal, height, width) RoPE positions of a batch of prompts, with tensor operations on the ids' device.

    Every text token advances a row's position by one; the placeholders of an image take the position reached before
    them plus their (t, h, w) coordinates in the image's token grid, and the image advances the position by
    `max(t, h, w)`. Images are matched to placeholders in prompt order (row by row), so back-to-back images in one run
    of placeholders are told apart by their grids.

    Args:
        input_ids: `(batch, seq)` token ids, left- or right-padded.
        image_grid_thw: `(num_images, 3)` patch grids of the semantic images, in prompt order (before merging).
        geometry_grid_thw: `(num_views, 3)` patch grids of the geometry views, in prompt order.
        attention_mask: `(batch, seq)`, 0 on padding.
        start_positions: `(batch,)` position of each row's first token (when continuing after a cache).
        past_length: number of cached tokens before `input_ids` (padding included).

    Returns:
        position_ids `(3, batch, seq)` (padding gets 1) and rope_deltas `(batch, 1)` such that the position of the
        text token at absolute sequence index i (cache included) after the prompt is `i + rope_deltas`.
    """
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    coordinates = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=device)
    advance = valid.long()  # how far each token moves the position on: 1 for text, 0 or an image's extent
    for token_id, grid_thw, merge_size, kind in (
        (image_token_id, image_grid_thw, spatial_merge_size, "semantic"),
        (geometry_token_id, geometry_grid_thw, 1, "geometry"),
    ):
        is_placeholder = (input_ids == token_id) & valid
        if grid_thw is None:
            grid_thw = torch.zeros(0, 3, dtype=torch.long, device=device)
        grids = grid_thw.to(device) // torch.tensor([1, merge_size, merge_size], device=device)
        if not torch.compiler.is_compiling():  # a user-facing check: one host read per prompt
            check_placeholders_match_grids(is_placeholder, grids, kind)
        if grids.shape[0] == 0:
            continue
        sizes = grids.prod(-1)
        ends = sizes.cumsum(0)
        ordinal = is_placeholder.flatten().long().cumsum(0).view_as(input_ids) - 1  # k-th placeholder of the batch
        image = torch.searchsorted(ends, ordinal, right=True).clamp(max=grids.shape[0] - 1)
        offset = ordinal - (ends - sizes)[image]
        t_len, h_len, w_len = grids[image].unbind(-1)
        grid_coordinates = torch.stack((offset // (h_len * w_len), offset // w_len % h_len, offset % w_len))
        coordinates = torch.where(is_placeholder, grid_coordinates, coordinates)
        is_last = is_placeholder & (offset == sizes[image] - 1)
        extent = torch.maximum(torch.maximum(t_len, h_len), w_len)
        advance = torch.where(is_placeholder, torch.where(is_last, extent, 0), advance)
    first = torch.zeros(input_ids.shape[0], dtype=torch.long, device=device)
    if start_positions is not None:
        first = start_positions.to(device=device, dtype=torch.long)
    reached = first[:, None] + advance.cumsum(dim=1) - advance  # the position reached before each token
    position_ids = torch.where(valid, reached + coordinates, 1)
    deltas = first + advance.sum(dim=1) - (past_length + input_ids.shape[1])
    return position_ids, deltas[:, None]


def check_placeholders_match_grids(is_placeholder: torch.BoolTensor, grids: torch.LongTensor, kind: str) -> None:
    """Raise a ValueError naming the mismatch when the placeholder runs of `kind` do not tile the images of `grids`
    `(num_images, 3)` (token grids), matched in prompt order."""
    flat = is_placeholder.flatten()
    # runs of placeholders (a run may hold several images back to back), as [start, end) placeholder ordinals
    begins = is_placeholder & ~shifted(is_placeholder, 1)
    run_starts = (flat.long().cumsum(0) - 1)[begins.flatten()].tolist()
    count = int(flat.sum())
    run_ends = [*run_starts[1:], count]
    image_ends = grids.prod(-1).cumsum(0).tolist()
    capacity = image_ends[-1] if image_ends else 0
    boundaries = {0, *image_ends}
    for start, end in zip(run_starts, run_ends):
        if start >= capacity:
            raise ValueError(
                f"The prompt holds more {kind} placeholder tokens than the {len(image_ends)} {kind} image(s) given: "
                f"pass one {kind} image per placeholder block."
            )
        if start not in boundaries or end not in boundaries:
            raise ValueError(
                f"A run of {end - start} {kind} placeholder tokens does not match the features of its image(s) "
                f"(token grids {grids.tolist()}): the number of placeholder tokens must equal the number of image "
                "features."
            )
    if count != capacity:
        used = sum(1 for end in image_ends if end <= count)
        raise ValueError(
            f"{len(image_ends)} {kind} image(s) were given but the prompt has placeholders for {used}: each image "
            "needs its own placeholder block in `input_ids`."
        )


def check_placeholders_are_wrapped(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int | None,
    geometry_token_id: int | None,
    vision_start_token_id: int,
    vision_end_token_id: int,
) -> None:
    """Raise a ValueError unless every run of one kind of placeholder (of the media given) sits directly between a
    `<|vision_start|>` and a `<|vision_end|>`, as the processor and the official code lay images out: a run without
    its markers, or an image's placeholders running straight into a geometry view's, has no defined attention block.
    A runtime assertion under `torch.compile` (no graph break)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    start = (input_ids == vision_start_token_id) & valid
    end = (input_ids == vision_end_token_id) & valid
    unwrapped = torch.zeros_like(valid)
    for token_id in (image_token_id, geometry_token_id):
        if token_id is None:
            continue
        placeholder = (input_ids == token_id) & valid
        run_begins = placeholder & ~shifted(placeholder, 1)
        run_ends = placeholder & ~shifted(placeholder, -1)
        unwrapped = unwrapped | (run_begins & ~shifted(start, 1)) | (run_ends & ~shifted(end, -1))
    torch_compilable_check(
        ~unwrapped.any(),
        "Each run of image or geometry placeholder tokens must sit directly between <|vision_start|> and "
        "<|vision_end|>, as the processor lays out each image and each geometry view: build the prompt with the "
        "processor (or its chat template).",
    )


def get_block_ids(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int | None,
    geometry_token_id: int | None,
    vision_start_token_id: int,
    vision_end_token_id: int,
) -> torch.LongTensor | None:
    """`(batch, seq)` ids of the bidirectional attention blocks (`-1` for causal text), or None when no image comes
    with the chunk (both placeholder ids None: text and decode steps).

    Each image with its start/end markers is a block; geometry views that follow each other directly (end marker
    then start marker) share one block, so all views of a scene attend to each other. The model refuses prompts
    whose placeholders are not wrapped so ([`check_placeholders_are_wrapped`]). Computed with tensor operations on
    the ids' device, without host syncs (padding at either end of a row, as the processor and `generate()` lay it
    out).
    """
    media_ids = [token for token in (image_token_id, geometry_token_id) if token is not None]
    if not media_ids:
        return None
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    media = torch.isin(input_ids, torch.tensor(media_ids, device=input_ids.device)) & valid
    geometry = (input_ids == geometry_token_id) & valid if geometry_token_id is not None else torch.zeros_like(media)

    start_marker = (input_ids == vision_start_token_id) & valid & shifted(media, -1)
    end_marker = (input_ids == vision_end_token_id) & valid & shifted(media, 1)
    in_block = media | start_marker | end_marker
    # whether each block token belongs to a geometry view: its own kind, or that of the placeholders it wraps
    is_geometry = geometry | (start_marker & shifted(geometry, -1)) | (end_marker & shifted(geometry, 1))
    same_run = media & shifted(media, 1) & (input_ids == shifted(input_ids, 1))
    opens = start_marker | (media & ~shifted(start_marker, 1) & ~same_run)  # a block piece begins here
    continues_scene = opens & is_geometry & shifted(end_marker & is_geometry, 1)  # next view of the same scene
    new_block = in_block & (~shifted(in_block, 1) | (opens & ~continues_scene))
    block_ids = new_block.long().cumsum(dim=1) - 1
    return torch.where(in_block, block_ids, torch.full_like(block_ids, TEXT_BLOCK_ID))


def block_last_index(block_ids: torch.LongTensor) -> torch.LongTensor:
    """`(batch, seq)` index of the last token each token attends to within its chunk: itself for causal text, the last
    token of its block for a token of a bidirectional block. Tensor operations only (no host read).

    With the padding of the keys this is the whole attention pattern of a prompt: every query sees a prefix of its row.
    """
    seq = block_ids.shape[1]
    positions = torch.arange(seq, device=block_ids.device).expand_as(block_ids)
    is_text = block_ids == TEXT_BLOCK_ID
    ends_block = is_text | (block_ids != shifted(block_ids, -1)) | (positions == seq - 1)
    last = torch.where(ends_block, positions, seq)  # the end of a run at its last token, past-the-end elsewhere
    return last.flip(1).cummin(dim=1).values.flip(1)
