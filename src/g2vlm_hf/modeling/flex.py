"""flex_attention for a chunk with image blocks, built so that changing prompt shapes never exhausts dynamo's
recompile limit.

transformers builds a fresh `mask_mod` closure per call (its structure depends on padding, packing and the blocks)
and compiles `create_block_mask` and `flex_attention` shape by shape: a dozen prompt layouts in one process pass
dynamo's recompile limit (8), after which flex runs uncompiled and materialises every score (on an H200, 16 views
took 5.6 s and 80 GiB instead of 0.98 s). Here, for a chunk with image blocks:

- the mask is G²VLM's prefix rule (`block_attention.PrefixLayout`: query i sees the valid keys up to `last_key[i]`),
  one `mask_mod` whose code never changes and which reads only tensors;
- the `BlockMask` is made directly from that rule at block granularity (`(q / 128) x (keys / 128)` entries, tensor
  operations, no compile, no tokens x tokens mask);
- queries and keys are padded to a few lengths (`flex_length`: multiples of 128, then four steps per doubling from
  512 on, so the padding is under a block or under a quarter of the length; padded queries see nothing and padded
  keys are never seen), and flex is compiled once per process through its own function (`FLEX_COMPILE`, static
  shapes: the CPU compiler fails on dynamic shapes with such masks in torch 2.13), so a graph is made per (length
  bucket, batch size, dtype) and reused; the bound is enforced: `FLEX_GRAPH_LIMIT` graphs (64) for this function,
  apart from transformers' own flex graphs (text chunks and decode steps keep transformers' path); past it the
  chunk goes to sdpa by query slices (one log line) instead of an uncompiled flex.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .block_attention import PrefixLayout

FLEX_BLOCK = 128
FlexGraphLimitReached = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", RuntimeError)
FLEX_GRAPH_LIMIT = 64
"""Graphs `FLEX_COMPILE` may hold: length buckets up to 128k tokens times a few batch sizes and dtypes."""


def _flex_call(query, key, value, block_mask, scale, enable_gqa):
    # its own function, so that its compiled graphs are counted apart from transformers' compiled flex_attention
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


FLEX_COMPILE = torch.compile(_flex_call, dynamic=False)
LIMIT_NAME = (
    "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
)  # torch < 2.7


def flex_length(length: int) -> int:
    """The padded length of `length` tokens: a multiple of 128 and of a quarter of the power of two below `length`
    (36 lengths up to 128k tokens; the padding is under one block of 128 or under a quarter of `length`)."""
    if length <= FLEX_BLOCK:
        return FLEX_BLOCK
    step = max((1 << ((length - 1).bit_length() - 1)) // 4, FLEX_BLOCK)
    return -(-length // step) * step


@dataclass
class FlexBlocks:
    """A chunk with image blocks under flex attention: its prefix layout and, once the first layer has seen the key
    buffer's length, the BlockMask every layer shares."""

    layout: PrefixLayout
    block_mask: BlockMask | None = None


def prefix_mask_mod(last_key: torch.Tensor, key_valid: torch.Tensor):
    """The mask of a prefix layout as flex's `mask_mod`: key k is seen by query q of row b when `k <= last_key[b, q]`
    and k is a real token (a padded query sees the keys up to itself, so no row is empty)."""

    def mask_mod(batch, head, q_index, kv_index):
        last = last_key[batch, q_index]
        return (kv_index <= last) & (key_valid[batch, kv_index] | (kv_index == last))

    return mask_mod


def prefix_block_mask(layout: PrefixLayout, q_len: int, kv_len: int) -> BlockMask:
    """The BlockMask of a prefix layout for `q_len` queries (the chunk's, then padding that sees nothing) over
    `kv_len` keys (the buffer's, then padding never seen), classified per block of `FLEX_BLOCK` x `FLEX_BLOCK`
    (empty, partial: `mask_mod` applies, full) with tensor operations."""
    last_key = F.pad(layout.last_key, (0, q_len - layout.last_key.shape[1]), value=-1)
    batch, device = last_key.shape[0], last_key.device
    q_blocks, kv_blocks = -(-q_len // FLEX_BLOCK), -(-kv_len // FLEX_BLOCK)
    q_pad, kv_pad = q_blocks * FLEX_BLOCK - q_len, kv_blocks * FLEX_BLOCK - kv_len
    key_valid = layout.key_valid
    if key_valid is None:
        key_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    key_valid = F.pad(key_valid, (0, kv_pad + kv_len - key_valid.shape[1]), value=False)  # buffer and block padding
    padded_last = F.pad(last_key, (0, q_pad), value=-1)
    # per query block: the furthest and the nearest last key of its queries
    reach = padded_last.view(batch, q_blocks, FLEX_BLOCK)
    furthest = reach.amax(-1)
    nearest = reach.amin(-1)
    block_start = torch.arange(kv_blocks, device=device) * FLEX_BLOCK
    touched = block_start[None, None, :] <= furthest[..., None]
    all_valid = key_valid.view(batch, kv_blocks, FLEX_BLOCK).all(-1)  # (batch, kv_blocks)
    full = touched & ((block_start + FLEX_BLOCK - 1)[None, None, :] <= nearest[..., None]) & all_valid[:, None, :]
    partial = touched & ~full
    order = torch.arange(kv_blocks, device=device)

    def packed(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = selected.sum(-1, dtype=torch.int32)[:, None]
        indices = torch.argsort(torch.where(selected, order, order + kv_blocks), dim=-1).to(torch.int32)[:, None]
        return counts, indices

    kv_counts, kv_indices = packed(partial)
    full_counts, full_indices = packed(full)
    mask_mod = prefix_mask_mod(padded_last, key_valid)
    return BlockMask.from_kv_blocks(
        kv_counts, kv_indices, full_counts, full_indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )  # fmt: skip


def attend_flex_blocks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: FlexBlocks, scaling: float
) -> torch.Tensor:
    """flex attention of `query` `(batch, heads, q_len, dim)` over the key buffer with the chunk's BlockMask (made at
    the first layer, shared by the others). Returns `(batch, q_len, heads, dim)`."""
    q_len, kv_len = query.shape[2], key.shape[2]
    q_padded, kv_padded = flex_length(q_len), flex_length(kv_len)
    if blocks.block_mask is None:
        blocks.block_mask = prefix_block_mask(blocks.layout, q_padded, kv_padded)
    groups = query.shape[1] // key.shape[1]
    heads = query.shape[1]
    enable_gqa = groups > 1 and heads & (heads - 1) == 0  # flex's grouped-query kernels want a power-of-two count
    if groups > 1 and not enable_gqa:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    query = F.pad(query, (0, 0, 0, q_padded - q_len))
    key, value = (F.pad(states, (0, 0, 0, kv_padded - kv_len)) for states in (key, value))
    if torch.compiler.is_compiling():
        output = _flex_call(query, key, value, blocks.block_mask, scaling, enable_gqa)
    else:
        with torch._dynamo.config.patch(**{LIMIT_NAME: FLEX_GRAPH_LIMIT, "fail_on_recompile_limit_hit": True}):
            output = FLEX_COMPILE(query, key, value, blocks.block_mask, scaling, enable_gqa)
    return output[:, :, :q_len].transpose(1, 2)


__all__ = [
    "FLEX_COMPILE",
    "FLEX_GRAPH_LIMIT",
    "FlexBlocks",
    "FlexGraphLimitReached",
    "attend_flex_blocks",
    "flex_length",
    "prefix_block_mask",
]
