"""The shared attention through variable-length (flash-attention style) kernels.

One varlen call is either causal or not, while a G²VLM prompt mixes causal text with bidirectional image blocks. So
the tokens of each row are cut into runs at block boundaries: a run of text is causal, an image block (markers
included) is bidirectional, and every run attends to all valid keys of its row up to the run's end. All causal runs
go into one varlen call (causal masks aligned bottom-right, as flash-attention does when a query segment is shorter
than its key segment), all bidirectional runs into a second call. Keys are gathered per run, so a key is read once
per later run of its row (a few runs per prompt in practice).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_layout import TEXT_BLOCK_ID


@dataclass
class VarlenGroup:
    """Runs attended with one kernel call: packed query/key indices and their cumulative lengths."""

    causal: bool
    query_index: torch.LongTensor  # into (batch * q_len) flattened queries
    key_index: torch.LongTensor  # into (batch * kv_len) flattened keys, repeated per run
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class VarlenPlan:
    """How the queries of one forward pass attend: one group per kind of run (causal, bidirectional), and the
    varlen kernel (`flash_attn_varlen_func`'s signature) that computes them."""

    groups: list[VarlenGroup]
    batch: int
    q_len: int
    kv_len: int  # past + current tokens; a static cache may hold longer (unused) key buffers
    kernel: Callable


def plan_varlen_attention(
    batch: int,
    q_len: int,
    past_length: int,
    attention_mask: torch.Tensor | None,
    block_ids: torch.LongTensor | None,
    device: torch.device,
    kernel: Callable,
) -> VarlenPlan:
    """Cut every row into runs and pack them for varlen kernels, with tensor operations on `device` (no loop over
    tokens; the only host reads are the two maximum lengths the kernels take as integers).

    Args:
        batch, q_len: shape of the current chunk of queries.
        past_length: number of cached tokens before the chunk (the keys are `past_length + q_len` long).
        attention_mask: `(batch, past_length + q_len)`, 0 on padding (None: no padding).
        block_ids: `(batch, q_len)` bidirectional block of each query token, -1 for causal text (None: all causal).
    """
    kv_len = past_length + q_len
    key_valid = (
        torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device).bool()
    )
    query_valid = key_valid[:, past_length:]
    blocks = (
        torch.full((batch, q_len), TEXT_BLOCK_ID, dtype=torch.long, device=device)
        if block_ids is None
        else block_ids.to(device)
    )
    # the valid queries in row order, and where a run begins: a row's first valid query or a change of block
    rows, positions = torch.nonzero(query_valid, as_tuple=True)
    query_blocks = blocks[rows, positions]
    begins = torch.ones_like(rows, dtype=torch.bool)
    begins[1:] = (rows[1:] != rows[:-1]) | (query_blocks[1:] != query_blocks[:-1])
    run_of_query = begins.long().cumsum(0) - 1
    run_count = int(run_of_query[-1]) + 1 if run_of_query.numel() else 0
    run_length = torch.zeros(run_count, dtype=torch.long, device=device).index_add_(
        0, run_of_query, torch.ones_like(run_of_query)
    )
    run_row, run_causal = rows[begins], query_blocks[begins] == TEXT_BLOCK_ID
    run_last = positions[torch.cumsum(run_length, 0) - 1] + past_length  # absolute index of each run's last query
    # each run attends to the valid keys of its row up to its last query
    valid_before = key_valid.long().cumsum(dim=1)  # (batch, kv_len): valid keys at or before each index
    run_keys = valid_before[run_row, run_last]
    key_rows, key_positions = torch.nonzero(key_valid, as_tuple=True)
    row_key_start = F.pad(key_valid.long().sum(dim=1).cumsum(0), (1, 0))[:-1]  # first valid key of each row
    flat_keys = key_rows * kv_len + key_positions

    groups = []
    for causal in (True, False):
        selected = run_causal == causal
        if not bool(selected.any()):
            continue
        lengths, keys = run_length[selected], run_keys[selected]
        query_index = (rows * q_len + positions)[selected[run_of_query]]
        # the first `keys[r]` valid keys of run r's row, run after run
        starts = row_key_start[run_row[selected]]
        offsets = torch.arange(int(keys.sum()), device=device) - torch.repeat_interleave(
            F.pad(keys.cumsum(0), (1, 0))[:-1], keys
        )
        key_index = flat_keys[torch.repeat_interleave(starts, keys) + offsets]
        groups.append(
            VarlenGroup(
                causal=causal,
                query_index=query_index,
                key_index=key_index,
                cu_seqlens_q=F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
                cu_seqlens_k=F.pad(keys.cumsum(0), (1, 0)).to(torch.int32),
                max_seqlen_q=int(lengths.max()),
                max_seqlen_k=int(keys.max()),
            )
        )
    return VarlenPlan(groups=groups, batch=batch, q_len=q_len, kv_len=kv_len, kernel=kernel)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: VarlenPlan,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of `query` `(batch, heads, q_len, dim)` over `key`/`value` `(batch, kv_heads, kv_len, dim)` as
    `plan` says, through its kernel. Returns `(batch, q_len, heads, dim)`; padded query rows are zero."""
    batch, heads, q_len, dim = query.shape
    queries = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    keys = key.transpose(1, 2).reshape(-1, key.shape[1], dim)
    values = value.transpose(1, 2).reshape(-1, value.shape[1], dim)
    output = queries.new_zeros(batch * q_len, heads, dim)
    buffer_len = key.shape[2]
    for group in plan.groups:
        key_index = group.key_index
        if buffer_len != plan.kv_len:  # static cache: rows are buffer_len apart in the flattened keys
            key_index = key_index // plan.kv_len * buffer_len + key_index % plan.kv_len
        output[group.query_index] = plan.kernel(
            queries[group.query_index],
            keys[key_index],
            values[key_index],
            cu_seqlens_q=group.cu_seqlens_q,
            cu_seqlens_k=group.cu_seqlens_k,
            max_seqlen_q=group.max_seqlen_q,
            max_seqlen_k=group.max_seqlen_k,
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=group.causal,
        )
    return output.view(batch, q_len, heads, dim)


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
    """Plain PyTorch implementation of `flash_attn_varlen_func`'s semantics (grouped-query heads, one attention per
    segment, causal mask aligned to the bottom right), for CPUs and for testing the packing. No dropout."""
    if dropout_p:
        raise ValueError("The reference varlen attention has no dropout.")
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


def sdpa_varlen_attention(
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
    """`flash_attn_varlen_func`'s semantics through PyTorch's scaled_dot_product_attention, one call per segment.
    Used for prompts with image blocks under `attn_implementation="sdpa"`: a bidirectional block then needs no mask
    at all (the fast kernels apply), where one pass over the whole prompt would need a dense mixed mask."""
    output = q.new_empty(q.shape)
    for q0, q1, k0, k1 in segments(cu_seqlens_q, cu_seqlens_k):
        mask = bottom_right_causal_mask(q1 - q0, k1 - k0, q.device) if causal and q1 - q0 > 1 else None
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1)[None],
            k[k0:k1].transpose(0, 1)[None],
            v[k0:k1].transpose(0, 1)[None],
            attn_mask=mask,
            dropout_p=dropout_p,
            scale=softmax_scale,
            enable_gqa=True,
        )
        output[q0:q1] = attended[0].transpose(0, 1)
    return output
