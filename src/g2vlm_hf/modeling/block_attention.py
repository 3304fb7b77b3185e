"""The shared attention of a chunk with image blocks on sdpa, without a tokens x tokens mask.

Every query of a G²VLM prompt sees a prefix of its row's keys: a text token the keys up to itself, a token of an
image block (markers included) the keys up to the block's last token, minus the padding. So the whole pattern is one
integer per query, the index of the last key it sees (`token_layout.block_last_index`), and the padding of the keys.
The queries are attended in slices of `QUERY_CHUNK` tokens through torch's sdpa, each slice with its own
`(batch, 1, slice, keys)` boolean mask made on the fly from those integers: the largest mask is `QUERY_CHUNK x keys`,
so memory grows linearly with the prompt (with the number of views), and nothing waits for the host (the slices are
fixed by the shapes, so `torch.compile` traces it as one graph). On the CPU and on CUDA sdpa runs its fused kernels
with such masks (flash on CPU, memory-efficient on CUDA). In CUDA half precision the default goes to the fused varlen
kernel instead (`torch_varlen.py`); eager alone builds the dense mask (it is the readable reference).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_layout import block_last_index

QUERY_CHUNK = 512
"""Queries attended per sdpa call: the masks made hold at most `QUERY_CHUNK x keys` booleans per row."""


@dataclass
class PrefixLayout:
    """Who attends to whom in one chunk: `last_key[b, i]` is the absolute index of the last key query i of row b sees
    (cache included); `key_valid` `(batch, past + q_len)` is False on padding (None: no padding)."""

    last_key: torch.LongTensor
    key_valid: torch.BoolTensor | None
    past_length: int


def prefix_layout(past_length: int, attention_mask: torch.Tensor | None, block_ids: torch.LongTensor) -> PrefixLayout:
    """The layout of a chunk of queries after `past_length` cached tokens, from its block ids `(batch, q_len)` and the
    2D padding mask `(batch, past + q_len)` (or None)."""
    key_valid = None if attention_mask is None else attention_mask.to(block_ids.device).bool()
    return PrefixLayout(block_last_index(block_ids) + past_length, key_valid, past_length)


def attend_query_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PrefixLayout,
    *,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attend `query` `(batch, heads, q_len, dim)` over `key`/`value` `(batch, kv_heads, keys, dim)` slice by slice
    with sdpa. Returns `(batch, q_len, heads, dim)`. A padded query sees only its own key (its output is meaningless and
    dropped by the caller), so no mask row is empty."""
    q_len, buffer_len = query.shape[2], key.shape[2]
    key, value, grouped = shared_key_value_heads(query, key, value)
    key_index = torch.arange(buffer_len, device=query.device)
    key_valid = layout.key_valid
    if key_valid is not None:
        # a static cache holds longer key buffers: the unused slots lie past every query's last key anyway
        key_valid = F.pad(key_valid, (0, buffer_len - key_valid.shape[1]), value=False)[:, None, :]
    outputs = []
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q_len)
        allowed = key_index <= layout.last_key[:, start:stop, None]
        if key_valid is not None:
            own_key = torch.arange(start + layout.past_length, stop + layout.past_length, device=query.device)
            allowed = (allowed & key_valid) | (key_index == own_key[:, None])
        output = F.scaled_dot_product_attention(
            query[:, :, start:stop], key, value, attn_mask=allowed[:, None], dropout_p=dropout, scale=scaling,
            enable_gqa=grouped,
        )  # fmt: skip
        outputs.append(output.transpose(1, 2))
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)).contiguous()


def shared_key_value_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The keys and values as every query slice takes them, and whether sdpa groups the query heads itself.

    With fewer key/value heads than query heads, a kernel that groups heads under a mask gets them as they are
    (`enable_gqa`); otherwise they are repeated here, once for all slices, instead of once per slice as transformers'
    sdpa function would."""
    groups = query.shape[1] // key.shape[1]
    if groups == 1:
        return key, value, False
    if groups_heads_under_a_mask(query.device):
        return key, value, True
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), False


def groups_heads_under_a_mask(device: torch.device) -> bool:
    """Whether sdpa's fused kernel for a boolean mask takes grouped key/value heads on `device`: the CPU's does;
    CUDA's masked kernels do not (with `enable_gqa` sdpa would fall back to the unfused math)."""
    return device.type == "cpu"
