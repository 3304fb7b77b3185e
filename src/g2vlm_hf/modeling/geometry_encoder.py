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


class G2VLMPackedWindowAttention(Dinov2WithRegistersAttention):
    """DINOv2 self-attention over the official packed windows (see the module docstring). Same weights and
    names as `Dinov2WithRegistersAttention`; only which tokens attend to which differs."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *, views_per_scene: int, **kwargs
    ) -> tuple[torch.Tensor, None]:
        num_views_total, tokens_per_view, _ = hidden_states.shape
        num_scenes = num_views_total // views_per_scene
        num_patches = tokens_per_view - 1 - self.config.num_register_tokens
        windowed = num_patches * views_per_scene

        def windows(projection: torch.nn.Linear) -> torch.Tensor:
            # (scenes, views * tokens, heads, head_dim) -> (scenes * views, heads, num_patches, head_dim)
            states = projection(hidden_states).view(num_scenes, views_per_scene * tokens_per_view, -1, self.head_dim)
            return states[:, :windowed].reshape(num_scenes * views_per_scene, num_patches, -1, self.head_dim).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        window_output, _ = attention_interface(
            self,
            windows(self.q_proj),
            windows(self.k_proj),
            windows(self.v_proj),
            None,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
        )
        packed = window_output.new_zeros(num_scenes, views_per_scene * tokens_per_view, window_output.shape[-2] * self.head_dim)
        packed[:, :windowed] = window_output.reshape(num_scenes, windowed, -1)
        return self.o_proj(packed.view(num_views_total, tokens_per_view, -1)), None


class G2VLMGeometryEncoder(Dinov2WithRegistersModel):
    """DINOv2 with registers returning the normed patch tokens of each view.

    Args:
        config: the DINOv2-with-registers configuration.
        packed_windows: reproduce the official packed-window attention (see the module docstring).
    """

    def __init__(self, config: Dinov2WithRegistersConfig, packed_windows: bool = False):
        super().__init__(config)
        self.packed_windows = packed_windows
        if packed_windows:
            for layer in self.encoder.layer:
                layer.attention = G2VLMPackedWindowAttention(config)
            self.post_init()

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
        if self.packed_windows:
            kwargs["views_per_scene"] = views_per_scene
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, None, **kwargs)
        hidden_states = self.layernorm(hidden_states)
        return hidden_states[:, 1 + self.config.num_register_tokens :]


__all__ = ["G2VLMGeometryEncoder"]
