"""The building blocks of the geometry heads' decoders: 2D rotary embedding, self- and cross-attention blocks at the
decoder width, and the pixel head that unfolds each patch token into its pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_g2vlm import G2VLMConfig


class G2VLMRotary2D(nn.Module):
    """2D rotary embedding: the first half of each head rotates with the patch row, the second half with the
    patch column (each half a standard 1D RoPE with base `theta`, rotating its two quarters)."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = theta

    def embeddings(
        self, positions: torch.Tensor, head_dim: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables `(1, seq, 1, head_dim)` for `(batch, seq, heads, head_dim)` states, computed once
        per forward and shared by every block. The sin table carries the signs of the quarter swap (see `apply`)."""
        half = head_dim // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, half, 2, device=positions.device, dtype=torch.float32) / half))
        angles = positions.to(torch.float32)[..., None] * inv_freq  # (1, seq, 2, head_dim / 4): rows, columns
        cos, sin = angles.cos(), angles.sin()
        cos = torch.stack((cos, cos), dim=-2).flatten(-3)  # quarters: row, row, column, column
        sin = torch.stack((-sin, sin), dim=-2).flatten(-3)
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)

    @staticmethod
    def apply(states: torch.Tensor, embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate `states` `(batch, seq, ..., head_dim)`: in each half, the quarters (a, b) become
        (a cos - b sin, b cos + a sin), i.e. `states * cos + swapped * signed_sin` with swapped = (b, a)."""
        cos, sin = embeddings
        quarters = states.unflatten(-1, (2, 2, -1))
        swapped = torch.stack((quarters[..., 1, :], quarters[..., 0, :]), dim=-2).flatten(-3)  # faster than flip
        if states.ndim == 5:  # (batch, seq, q/k, heads, head_dim)
            cos, sin = cos[:, :, None], sin[:, :, None]
        return torch.addcmul(states * cos, swapped, sin)


class G2VLMHeadAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, seq, 3, self.num_heads, dim // self.num_heads)
        query, key = G2VLMRotary2D.apply(qkv[:, :, :2], rope).permute(2, 0, 3, 1, 4)  # queries and keys at once
        attn = F.scaled_dot_product_attention(query, key, qkv[:, :, 2].transpose(1, 2))
        return self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))


class G2VLMHeadCrossAttention(nn.Module):
    """Multi-head cross-attention with 2D RoPE on queries and keys: the views of a scene attend to one context
    sequence of that scene (its first view), whose keys and values are computed once per scene."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (self.num_heads, -1))

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """hidden_states `(scenes * views, seq, dim)`, context `(scenes, seq, dim)`."""
        scenes, dim = context.shape[0], context.shape[-1]
        # queries and the context share the same patch grid, hence the same rotary tables
        query = G2VLMRotary2D.apply(self._heads(self.query(hidden_states)), rope)
        key = G2VLMRotary2D.apply(self._heads(self.key(context)), rope)
        value = self._heads(self.value(context))
        # each query attends to its scene's context alone: a scene's views are one query sequence
        query = query.reshape(scenes, -1, self.num_heads, dim // self.num_heads)
        attn = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return self.proj(attn.transpose(1, 2).reshape(hidden_states.shape))


class G2VLMHeadMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class G2VLMHeadBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: self-attention with 2D RoPE, then MLP."""

    def __init__(self, config: G2VLMConfig):
        super().__init__()
        dim, eps = config.text_config.hidden_size, config.head_layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = G2VLMHeadAttention(dim, config.head_num_attention_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = G2VLMHeadMLP(dim, int(dim * config.head_mlp_ratio))

    def forward(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rope)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class G2VLMHeadCrossBlock(GradientCheckpointingLayer):
    """Pre-norm block: self-attention, cross-attention to a context `(scenes, seq, dim)` (each scene's first view),
    then MLP."""

    def __init__(self, config: G2VLMConfig):
        super().__init__()
        dim, eps, heads = config.text_config.hidden_size, config.head_layer_norm_eps, config.head_num_attention_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = G2VLMHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm_y = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = G2VLMHeadCrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = G2VLMHeadMLP(dim, int(dim * config.head_mlp_ratio))

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), rope)
        context = self.norm_y(context)
        hidden_states = hidden_states + self.cross_attn(self.norm2(hidden_states), context, rope)
        return hidden_states + self.mlp(self.norm3(hidden_states))


class G2VLMHeadDecoder(nn.Module):
    """`head_depth` blocks at the decoder width, then a linear projection to `out_dim`. With `cross_attention`,
    every block also attends to a context sequence."""

    def __init__(self, config: G2VLMConfig, out_dim: int, cross_attention: bool = False):
        super().__init__()
        block = G2VLMHeadCrossBlock if cross_attention else G2VLMHeadBlock
        self.blocks = nn.ModuleList(block(config) for _ in range(config.head_depth))
        self.linear_out = nn.Linear(config.text_config.hidden_size, out_dim)

    def forward(
        self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for block in self.blocks:
            if context is None:
                hidden_states = block(hidden_states, rope)
            else:
                hidden_states = block(hidden_states, context, rope)
        return self.linear_out(hidden_states)


class G2VLMPixelHead(nn.Module):
    """Linear map of each patch token to `channels * patch**2` values, pixel-shuffled to full resolution."""

    def __init__(self, in_dim: int, channels: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_dim, channels * patch_size**2)

    def forward(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """tokens `(batch, grid_h * grid_w, in_dim)` -> `(batch, grid_h * patch, grid_w * patch, channels)`."""
        features = self.proj(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)
        return F.pixel_shuffle(features, self.patch_size).permute(0, 2, 3, 1)


__all__ = ["G2VLMHeadDecoder", "G2VLMPixelHead", "G2VLMRotary2D"]
