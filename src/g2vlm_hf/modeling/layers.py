"""Small building blocks shared by the two-expert decoder."""

from __future__ import annotations

from collections.abc import Callable

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
    """SwiGLU MLP of one expert.

    The leaves are `gate_proj`, `up_proj`, `down_proj` for the semantic expert and `geo_gate_proj`, `geo_up_proj`,
    `geo_down_proj` for the geometry expert (`prefix="geo_"`), so that PEFT's suffix matching tells the experts apart.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, prefix: str = ""):
        super().__init__()
        self.prefix = prefix
        setattr(self, f"{prefix}gate_proj", nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, f"{prefix}up_proj", nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, f"{prefix}down_proj", nn.Linear(intermediate_size, hidden_size, bias=False))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = getattr(self, f"{self.prefix}gate_proj")(hidden_states)
        up = getattr(self, f"{self.prefix}up_proj")(hidden_states)
        return getattr(self, f"{self.prefix}down_proj")(self.act_fn(gate) * up)


def route_tokens(
    hidden_states: torch.Tensor,
    geometry_mask: torch.BoolTensor | None,
    semantic: Callable[[torch.Tensor], torch.Tensor],
    geometry: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Apply `semantic` to the semantic tokens and `geometry` to the geometry tokens of `hidden_states`.

    Args:
        hidden_states: `(batch, seq, ...)`.
        geometry_mask: `(batch, seq)`, True on geometry tokens; None when there are none (the semantic expert
            then serves every token, e.g. while decoding text).
    """
    if geometry_mask is None:
        return semantic(hidden_states)
    semantic_out = semantic(hidden_states[~geometry_mask])
    geometry_out = geometry(hidden_states[geometry_mask])
    out = semantic_out.new_empty(*geometry_mask.shape, *semantic_out.shape[1:])
    out[~geometry_mask] = semantic_out
    out[geometry_mask] = geometry_out.to(semantic_out.dtype)
    return out
