"""Where the images sit in a G²VLM prompt: multimodal RoPE positions and bidirectional attention blocks.

A semantic image is `<|vision_start|>` + `<|image_pad|>` * (t * h * w / merge**2) + `<|vision_end|>`; a geometry view
is `<|vision_start|>` + `<|geo_pad|>` * (h * w) + `<|vision_end|>`. For an image starting at position p, the start
marker gets p, its tokens get (p + 1 + t, p + 1 + h, p + 1 + w) over their grid, the end marker gets
p + 1 + max(t_len, h_len, w_len), and the next token continues from there. Each image (markers included) is one
bidirectional attention block; consecutive geometry views (one scene) merge into ONE block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEXT_BLOCK_ID = -1


@dataclass(frozen=True)
class MediaRun:
    """A maximal run of one placeholder token inside a row of (unpadded) token ids."""

    start: int
    end: int  # exclusive
    is_geometry: bool


def find_media_runs(ids: list[int], image_token_id: int | None, geometry_token_id: int | None) -> list[MediaRun]:
    """Runs of image or geometry placeholders in `ids`, in order (a None id is not looked for)."""
    runs, i = [], 0
    while i < len(ids):
        token = ids[i]
        if token in (image_token_id, geometry_token_id):
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append(MediaRun(i, j, token == geometry_token_id))
            i = j
        else:
            i += 1
    return runs


class _GridQueue:
    """Hands out (t, h, w) token grids in prompt order and checks that every grid gets used."""

    def __init__(self, grid_thw: torch.Tensor | None, merge_size: int, kind: str):
        self.grids = [] if grid_thw is None else [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        self.merge_size = merge_size
        self.kind = kind
        self.next = 0

    def take(self) -> tuple[int, int, int]:
        if self.next >= len(self.grids):
            raise ValueError(
                f"The prompt holds more {self.kind} placeholder tokens than the {len(self.grids)} {self.kind} "
                f"image(s) given: pass one {self.kind} image per placeholder block."
            )
        t, h, w = self.grids[self.next]
        self.next += 1
        return t, h // self.merge_size, w // self.merge_size

    @property
    def exhausted(self) -> bool:
        return self.next >= len(self.grids)

    def check_all_used(self) -> None:
        if self.next != len(self.grids):
            raise ValueError(
                f"{len(self.grids)} {self.kind} image(s) were given but the prompt has placeholders for "
                f"{self.next}: each image needs its own placeholder block in `input_ids`."
            )


def _split_run(run: MediaRun, queue: _GridQueue) -> list[tuple[int, int, int]]:
    """Grids covering one placeholder run (several images may sit back to back)."""
    grids, remaining = [], run.end - run.start
    while remaining > 0 and not (grids and queue.exhausted):
        t, h, w = queue.take()
        remaining -= t * h * w
        grids.append((t, h, w))
    if remaining != 0:
        raise ValueError(
            f"A run of {run.end - run.start} {queue.kind} placeholder tokens does not match the features of its "
            f"image(s) (grids {grids}): the number of placeholder tokens must equal the number of image features."
        )
    return grids


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
    """3D (temporal, height, width) RoPE positions of a batch of prompts.

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
    batch_size, seq_len = input_ids.shape
    images = _GridQueue(image_grid_thw, spatial_merge_size, "semantic")
    views = _GridQueue(geometry_grid_thw, 1, "geometry")
    position_ids = torch.ones(3, batch_size, seq_len, dtype=torch.long)
    deltas = torch.zeros(batch_size, 1, dtype=torch.long)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for row in range(batch_size):
        ids = input_ids[row][mask[row]].tolist()
        first = 0 if start_positions is None else int(start_positions[row])
        row_positions, cursor, index = [], first, 0
        for run in find_media_runs(ids, image_token_id, geometry_token_id):
            text_len = run.start - index
            row_positions.append(torch.arange(cursor, cursor + text_len).expand(3, -1))
            cursor += text_len
            for t, h, w in _split_run(run, views if run.is_geometry else images):
                grid = torch.stack(
                    torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                ).flatten(1)
                row_positions.append(grid + cursor)
                cursor += max(t, h, w)
            index = run.end
        row_positions.append(torch.arange(cursor, cursor + len(ids) - index).expand(3, -1))
        positions = torch.cat(row_positions, dim=1)
        position_ids[:, row, mask[row].cpu()] = positions
        next_position = int(positions.max()) + 1 if positions.numel() else first
        deltas[row] = next_position - (past_length + seq_len)
    images.check_all_used()
    views.check_all_used()
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def get_block_ids(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int | None,
    geometry_token_id: int | None,
    vision_start_token_id: int,
    vision_end_token_id: int,
) -> torch.LongTensor | None:
    """`(batch, seq)` ids of the bidirectional attention blocks (`-1` for causal text), or None without images.

    Each image with its start/end markers is a block; geometry views that follow each other directly (end marker
    then start marker) share one block, so all views of a scene attend to each other. Computed with tensor
    operations on the ids' device (padding at either end of a row, as the processor and `generate()` lay it out);
    the one host sync is the check whether the chunk holds any image at all.
    """
    media_ids = [token for token in (image_token_id, geometry_token_id) if token is not None]
    if not media_ids:
        return None
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    media = torch.isin(input_ids, torch.tensor(media_ids, device=input_ids.device)) & valid
    if not bool(media.any()):
        return None
    geometry = (input_ids == geometry_token_id) & valid if geometry_token_id is not None else torch.zeros_like(media)

    def shifted(values: torch.Tensor, step: int) -> torch.Tensor:
        """values[:, i - step] at i (False where that falls outside the row)."""
        return F.pad(values, (step, 0))[:, :-step] if step > 0 else F.pad(values, (0, -step))[:, -step:]

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
