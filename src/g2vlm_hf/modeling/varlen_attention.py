"""The shared attention of a prompt chunk with image blocks on a varlen kernel (flash-attention, or torch's own
`varlen_attn` through "torch_varlen", see torch_varlen.py): varlen calls over packed runs.

One flash-attention call is either causal or not, while a G²VLM prompt mixes causal text with bidirectional image
blocks. So the tokens of each row are cut into runs at block boundaries: a run of text is causal, an image block
(markers included) is bidirectional, and every run attends to all valid keys of its row up to the run's end. All causal
runs go into one varlen call (causal masks aligned bottom-right, as flash-attention does when a query segment is
shorter than its key segment), all bidirectional runs into a second call. Keys are gathered per run, so a key is read
once per later run of its row (a few runs per prompt in practice). Both calls go through transformers' attention
registry with `cu_seq_lens_q/k`, as transformers' Qwen2-VL vision attention passes its `cu_seqlens`.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_layout import TEXT_BLOCK_ID

# The operator namespace is this module's name: a Hub copy of this file (trust_remote_code) loaded in the same process
# as the package registers its own operator instead of silently replacing the package's.
OPERATOR_NAMESPACE = re.sub(r"\W", "_", __name__)


@dataclass
class VarlenGroup:
    """Runs attended with one varlen call: packed query/key indices and their cumulative lengths.

    Each group ends with a one-token sentinel segment (query 0 against key 0, its output dropped), so that a kernel
    never gets an empty batch (a chunk may hold no causal run) and no host check is needed: `query_index` is one
    longer than the queries the group answers.
    """

    causal: bool
    query_index: torch.LongTensor  # into (batch * q_len) flattened queries, then the sentinel
    key_index: torch.LongTensor  # into (batch * kv_len) flattened keys, repeated per run, then the sentinel
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor


@dataclass
class PackedRuns:
    """The runs of one chunk, packed for varlen calls: one group per kind of run (causal, bidirectional). The maximum
    lengths the kernels take are the chunk's and the keys' lengths (upper bounds, known without reading the runs on
    the host)."""

    groups: list[VarlenGroup]
    q_len: int
    kv_len: int  # past + current tokens; a static cache may hold longer (unused) key buffers
    implementation: str = "flash_attention_2"  # the attention function of the varlen calls (transformers' registry)


def pack_runs(
    q_len: int,
    past_length: int,
    attention_mask: torch.Tensor | None,
    block_ids: torch.LongTensor,
    implementation: str = "flash_attention_2",
) -> PackedRuns:
    """Cut every row of a chunk into runs and pack them for varlen calls.

    Args:
        q_len: length of the current chunk of queries.
        past_length: number of cached tokens before the chunk (the keys are `past_length + q_len` long).
        attention_mask: `(batch, past_length + q_len)`, 0 on padding (None: no padding).
        block_ids: `(batch, q_len)` bidirectional block of each query token, -1 for causal text.
        implementation: the registry name of the attention function that will attend the runs.
    """
    kv_len = past_length + q_len
    key_valid = (
        torch.ones(block_ids.shape[0], kv_len, dtype=torch.bool, device=block_ids.device)
        if attention_mask is None
        else attention_mask.to(block_ids.device).bool()
    )
    packed = pack_varlen_runs(key_valid, block_ids)
    groups = [VarlenGroup(causal, *packed[4 * index : 4 * index + 4]) for index, causal in enumerate((True, False))]
    return PackedRuns(groups=groups, q_len=q_len, kv_len=kv_len, implementation=implementation)


def varlen_runs(key_valid: torch.Tensor, block_ids: torch.Tensor) -> list[torch.Tensor]:
    """The packed runs of the causal and of the bidirectional group: `(query_index, key_index, cu_seqlens_q,
    cu_seqlens_k)` of each, sentinel included (see `VarlenGroup`).

    Tensor operations on the masks' device, no loop over tokens; the host reads only the sizes of its outputs (once
    per forward).

    Args:
        key_valid: `(batch, kv_len)` bool, False on padding; the last `q_len` keys are the chunk's queries.
        block_ids: `(batch, q_len)` bidirectional block of each query token, -1 for causal text.
    """
    device = key_valid.device
    q_len = block_ids.shape[1]
    kv_len = key_valid.shape[1]
    past_length = kv_len - q_len
    query_valid = key_valid[:, past_length:]
    # the valid queries in row order, and where a run begins: a row's first valid query or a change of block
    rows, positions = torch.nonzero(query_valid, as_tuple=True)
    query_blocks = block_ids[rows, positions]
    begins = torch.ones_like(rows, dtype=torch.bool)
    begins[1:] = (rows[1:] != rows[:-1]) | (query_blocks[1:] != query_blocks[:-1])
    run_of_query = begins.long().cumsum(0) - 1
    run_count = int(begins.sum())
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
    sentinel = torch.zeros(1, dtype=torch.long, device=device)

    packed = []
    for causal in (True, False):
        selected = run_causal == causal
        lengths, keys = run_length[selected], run_keys[selected]
        query_index = (rows * q_len + positions)[selected[run_of_query]]
        # the first `keys[r]` valid keys of run r's row, run after run
        starts = row_key_start[run_row[selected]]
        offsets = torch.arange(int(keys.sum()), device=device) - torch.repeat_interleave(
            F.pad(keys.cumsum(0), (1, 0))[:-1], keys
        )
        key_index = flat_keys[torch.repeat_interleave(starts, keys) + offsets]
        cu_seqlens_q, cu_seqlens_k = F.pad(lengths.cumsum(0), (1, 0)), F.pad(keys.cumsum(0), (1, 0))
        packed += [
            torch.cat((query_index, sentinel)),
            torch.cat((key_index, sentinel)),
            torch.cat((cu_seqlens_q, cu_seqlens_q[-1:] + 1)).to(torch.int32),
            torch.cat((cu_seqlens_k, cu_seqlens_k[-1:] + 1)).to(torch.int32),
        ]
    return packed


@torch.library.custom_op(f"{OPERATOR_NAMESPACE}::pack_varlen_runs", mutates_args=())
def pack_varlen_runs(key_valid: torch.Tensor, block_ids: torch.Tensor) -> list[torch.Tensor]:
    """`varlen_runs` as an operator: the sizes of its outputs depend on the layout, and `torch.compile` traces
    through an operator with symbolic sizes instead of breaking the graph."""
    return varlen_runs(key_valid, block_ids)


@pack_varlen_runs.register_fake
def _(key_valid: torch.Tensor, block_ids: torch.Tensor) -> list[torch.Tensor]:
    context = torch.library.get_ctx()
    packed = []
    for _ in range(2):
        # the sentinel segment: at least one query and one key, at least two sequence boundaries
        queries, keys, runs = (context.new_dynamic_size(min=minimum) for minimum in (1, 1, 2))
        packed += [
            key_valid.new_empty(queries, dtype=torch.long),
            key_valid.new_empty(keys, dtype=torch.long),
            key_valid.new_empty(runs, dtype=torch.int32),
            key_valid.new_empty(runs, dtype=torch.int32),
        ]
    return packed


def attend_packed_runs(
    module: torch.nn.Module,
    attention_interface: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    runs: PackedRuns,
    **kwargs,
) -> torch.Tensor:
    """Attend `query` `(batch, heads, q_len, dim)` over `key`/`value` `(batch, kv_heads, kv_len, dim)` run by run:
    one call of `attention_interface` (a flash-attention function of transformers' registry) per group, on the packed
    tokens with `cu_seq_lens_q/k`. Returns `(batch, q_len, heads, dim)` with zero rows on padded queries."""
    batch, heads, q_len, dim = query.shape
    queries = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    keys = key.transpose(1, 2).reshape(-1, key.shape[1], dim)
    values = value.transpose(1, 2).reshape(-1, value.shape[1], dim)
    output = queries.new_zeros(batch * q_len, heads, dim)
    buffer_len = key.shape[2]
    for group in runs.groups:
        key_index = group.key_index
        if buffer_len != runs.kv_len:  # static cache: rows are buffer_len apart in the flattened keys
            key_index = key_index // runs.kv_len * buffer_len + key_index % runs.kv_len
        attended, _ = attention_interface(
            module,
            queries[group.query_index].transpose(0, 1)[None],  # one packed sequence: (1, heads, tokens, dim)
            keys[key_index].transpose(0, 1)[None],
            values[key_index].transpose(0, 1)[None],
            None,
            cu_seq_lens_q=group.cu_seqlens_q,
            cu_seq_lens_k=group.cu_seqlens_k,
            max_length_q=runs.q_len,
            max_length_k=runs.kv_len,
            is_causal=group.causal,
            **kwargs,
        )
        output = output.index_copy(0, group.query_index[:-1], attended[0, :-1])  # the sentinel's row is dropped
    return output.view(batch, q_len, heads, dim)
