"""The geometry encoder: transformers' DINOv2-with-registers, keeping only the patch tokens after the final norm.

The released G²VLM weights were trained with an unusual attention in this encoder, reproduced here as the
`"official_packed_windows"` mode: the official code packs the views of a scene into one sequence of
`num_views * (1 + registers + num_patches)` tokens and runs variable-length attention with sequence boundaries
counted in PATCH tokens, so window i covers packed tokens `[i * num_patches, (i + 1) * num_patches)` (straddling
view boundaries) and the last `(1 + registers) * num_views` tokens belong to no window: their attention output is
zero. `"per_view"` is plain DINOv2 attention over each view.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    eager_attention_forward,
)

# G²VLM never masks patches: left trainable, DINOv2's mask token would get no gradient, which breaks DDP without
# `find_unused_parameters` and leaves it out of sharded optimizer checkpoints. Frozen, and never made trainable.
UNUSED_PARAMETERS = ("embeddings.mask_token",)


class G2VLMGeometryEncoderAttention(Dinov2WithRegistersAttention):
    """DINOv2 self-attention with two changes to transformers' `Dinov2WithRegistersAttention`:

    - leaf names `query`, `key`, `value`, `dense` (the original DINOv2 names) instead of `q_proj`, `k_proj`,
      `v_proj`, `o_proj`, so that PEFT's suffix matching of a standard LoRA recipe (`target_modules=["q_proj",
      "v_proj"]`) adapts the decoder's semantic expert only, not the geometry encoder;
    - the optional official packed-window pattern (see the module docstring).
    """

    def __init__(self, config: Dinov2WithRegistersConfig, packed_windows: bool = False):
        super().__init__(config)
        self.query, self.key, self.value, self.dense = self.q_proj, self.k_proj, self.v_proj, self.o_proj
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj
        self.packed_windows = packed_windows

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        views_per_scene: int = 1,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        num_views_total, tokens_per_view, _ = hidden_states.shape
        if self.packed_windows:
            # one packed sequence per scene, cut into windows of num_patches tokens; the tail gets no window
            num_scenes = num_views_total // views_per_scene
            window = tokens_per_view - 1 - self.config.num_register_tokens
            windowed = window * views_per_scene
        else:
            num_scenes, views_per_scene, window, windowed = num_views_total, 1, tokens_per_view, tokens_per_view

        def split(projection: torch.nn.Linear) -> torch.Tensor:
            # (scenes, tokens, heads, head_dim) -> (windows, heads, window, head_dim)
            states = projection(hidden_states).view(num_scenes, views_per_scene * tokens_per_view, -1, self.head_dim)
            return states[:, :windowed].reshape(-1, window, states.shape[2], self.head_dim).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        window_output, _ = attention_interface(
            self,
            split(self.query),
            split(self.key),
            split(self.value),
            attention_mask if not self.packed_windows else None,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )
        width = window_output.shape[-2] * self.head_dim
        if windowed == views_per_scene * tokens_per_view:
            attended = window_output.reshape(num_views_total, tokens_per_view, width)
        else:
            attended = window_output.new_zeros(num_scenes, views_per_scene * tokens_per_view, width)
            attended[:, :windowed] = window_output.reshape(num_scenes, windowed, width)
            attended = attended.view(num_views_total, tokens_per_view, width)
        return self.dense(attended), None


class G2VLMGeometryEncoder(Dinov2WithRegistersModel):
    """DINOv2 with registers returning the normed patch tokens of each view.

    Args:
        config: the DINOv2-with-registers configuration.
        packed_windows: reproduce the official packed-window attention (see the module docstring).
    """

    def __init__(self, config: Dinov2WithRegistersConfig, packed_windows: bool = False):
        super().__init__(config)
        self.packed_windows = packed_windows
        for layer in self.encoder.layer:
            layer.attention = G2VLMGeometryEncoderAttention(config, packed_windows)
        self.post_init()
        for name in UNUSED_PARAMETERS:
            self.get_parameter(name).requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, views_per_scene: int = 1, **kwargs) -> torch.Tensor:
        """
        Args:
            pixel_values: `(scenes * views, 3, H, W)`, normalised, H and W multiples of the patch size; the views of
                a scene are consecutive.
            views_per_scene: number of consecutive views forming one scene (used by the packed-window mode).

        Returns:
            `(scenes * views, H / patch * W / patch, hidden)` patch tokens after the final layer norm.
        """
        hidden_states = self.embeddings(pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype))
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, None, views_per_scene=views_per_scene, **kwargs)
        hidden_states = self.layernorm(hidden_states)
        return hidden_states[:, 1 + self.config.num_register_tokens :]


__all__ = ["G2VLMGeometryEncoder"]
