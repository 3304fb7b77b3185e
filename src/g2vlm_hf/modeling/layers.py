"""Small building blocks shared by the two-expert decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN


class G2VLMLayerScale(nn.Module):
    """Per-channel scale `gamma` applied to a residual branch (geometry expert only)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.gamma


class G2VLMMLP(nn.Module):
    """SwiGLU MLP of the semantic expert, with Qwen2's leaf names."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class G2VLMGeometryMLP(nn.Module):
    """SwiGLU MLP of the geometry expert. Its leaves are `geo_`-prefixed so that PEFT's suffix matching of the Qwen2
    names (`gate_proj`, ...) selects the semantic expert only."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.geo_gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.geo_up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.geo_down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.geo_down_proj(self.act_fn(self.geo_gate_proj(hidden_states)) * self.geo_up_proj(hidden_states))


@dataclass(frozen=True)
class ExpertSplit:
    """Which tokens each expert serves, computed once per forward and reused by every sublayer of every layer.

    `semantic` and `geometry` index the flattened `(batch * seq)` tokens, in order; gathers and scatters by index
    never wait for the host, unlike boolean-mask indexing.
    """

    mask: torch.BoolTensor  # (batch, seq), True on geometry tokens
    semantic: torch.LongTensor
    geometry: torch.LongTensor

    @classmethod
    def from_mask(cls, geometry_mask: torch.BoolTensor | None, geometry_count: int | None = None) -> ExpertSplit | None:
        """The split of `geometry_mask`, or None when no token is a geometry token (the semantic expert serves all).

        `geometry_count`, the number of geometry tokens, is known from the geometry inputs' shape; with it the split
        needs no host read (a stable sort puts the geometry tokens first, in order). Without it the mask is counted.
        """
        if geometry_mask is None:
            return None
        flat = geometry_mask.flatten()
        if geometry_count is None:
            geometry_count = int(flat.sum())
        if geometry_count == 0:
            return None
        order = torch.argsort((~flat).to(torch.uint8), stable=True)
        return cls(mask=geometry_mask, semantic=order[geometry_count:], geometry=order[:geometry_count])


def route_tokens(
    hidden_states: torch.Tensor,
    split: ExpertSplit | None,
    semantic: Callable[[torch.Tensor], torch.Tensor],
    geometry: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply `semantic` to the semantic tokens and `geometry` to the geometry tokens of `hidden_states`
    `(batch, seq, ...)`; with no split the semantic expert serves every token (text, decoding)."""
    if split is None:
        return semantic(hidden_states)
    flat = hidden_states.flatten(0, 1)
    semantic_out = semantic(flat.index_select(0, split.semantic))
    geometry_out = geometry(flat.index_select(0, split.geometry)).to(semantic_out.dtype)
    out = semantic_out.new_empty(flat.shape[0], *semantic_out.shape[1:])
    out.index_copy_(0, split.semantic, semantic_out)  # in place: every row is written once, nothing is copied twice
    out.index_copy_(0, split.geometry, geometry_out)
    return out.view(*hidden_states.shape[:2], *semantic_out.shape[1:])
