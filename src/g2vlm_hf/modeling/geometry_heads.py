"""Pi3-style geometry heads: per-view transformer decoders over the decoder's geometry tokens, then small heads for
local point maps, camera poses, global point maps and (optionally) confidence. The building blocks live in
`head_layers.py`, the camera head in `camera_head.py`, the output activations in `head_activations.py`.

Every head sees the same input: the final-normed hidden states of one view's geometry tokens,
`(scenes * views, h * w, hidden)`, with a 2D RoPE over the `(h, w)` patch grid.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .camera_head import G2VLMCameraHead
from .configuration_g2vlm import G2VLMConfig
from .head_activations import get_head_activation
from .head_layers import G2VLMHeadDecoder, G2VLMPixelHead, G2VLMRotary2D
from .outputs import G2VLMReconstructionOutput
from .rigid import transform_points

logger = logging.get_logger(__name__)


class G2VLMGeometryHeads(nn.Module):
    """All geometry heads. Their weights stay in float32 when loaded (`_keep_in_fp32_modules_strict`). The head
    decoders (transformer blocks) run as the official code runs them on a GPU: under autocast to the decoder's half
    precision when its geometry tokens come in bfloat16/float16, in float32 otherwise
    (`config.head_decoder_precision="float32"`: always float32). The output heads, the exponential depth and the SVD
    always run in float32 with autocast off: they are unstable in half precision. A model cast as a whole afterwards
    (`model.to(torch.bfloat16)`) runs the head decoders in that dtype and still takes the exponential and the SVD,
    and returns every output, in float32."""

    def __init__(self, config: G2VLMConfig):
        super().__init__()
        self.patch_size = config.geometry_patch_size
        self.config = config  # `head_decoder_precision` is read at each call, so a change after loading applies
        self.head_dim = config.text_config.hidden_size // config.head_num_attention_heads
        self.rope = G2VLMRotary2D(config.head_rope_theta)
        self.depth_activation = get_head_activation(config.depth_activation)
        self.confidence_activation = get_head_activation(config.confidence_activation)
        point_dim, camera_dim = config.point_head_hidden_size, config.camera_head_hidden_size
        self.point_decoder = G2VLMHeadDecoder(config, point_dim)
        self.point_head = G2VLMPixelHead(point_dim, 3, self.patch_size)
        self.camera_decoder = G2VLMHeadDecoder(config, camera_dim)
        self.camera_head = G2VLMCameraHead(camera_dim)
        self.global_points_decoder = None
        self.global_point_head = None
        if config.use_global_points:
            self.global_points_decoder = G2VLMHeadDecoder(config, point_dim, cross_attention=True)
            self.global_point_head = G2VLMPixelHead(point_dim, 3, self.patch_size)
        self.confidence_decoder = None
        self.confidence_head = None
        if config.use_confidence_head:
            self.confidence_decoder = G2VLMHeadDecoder(config, point_dim)
            self.confidence_head = G2VLMPixelHead(point_dim, 1, self.patch_size)

    def forward(self, geometry_tokens: torch.Tensor) -> G2VLMReconstructionOutput:
        """
        Args:
            geometry_tokens: `(scenes, views, grid_h, grid_w, hidden)` final-normed decoder states of the geometry
                tokens.

        Returns:
            [`G2VLMReconstructionOutput`] with `camera_poses (scenes, views, 4, 4)`, `local_points`, `world_points`,
            `global_points` `(scenes, views, H, W, 3)`, `depth (scenes, views, H, W)` and `confidence` (or None);
            `intrinsics` is left to the caller (`intrinsics.estimate_intrinsics`), so that training does not fit them.
        """
        scenes, views, grid_h, grid_w, dim = geometry_tokens.shape
        dtype = self.camera_head.fc_t.weight.dtype
        if dtype != torch.float32:
            logger.warning_once(
                f"The geometry heads are in {dtype}, not float32 (the model was cast after loading); load with "
                "`from_pretrained(..., dtype=...)` instead to keep them in float32 for full-precision geometry."
            )
        half = geometry_tokens.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32
        autocast_dtype = geometry_tokens.dtype if half and self.config.head_decoder_precision == "auto" else None
        tokens = geometry_tokens.reshape(scenes * views, grid_h * grid_w, dim).to(dtype)
        rows, columns = torch.meshgrid(
            torch.arange(grid_h, device=tokens.device), torch.arange(grid_w, device=tokens.device), indexing="ij"
        )
        positions = torch.stack((rows, columns), dim=-1).view(1, -1, 2)
        rope = self.rope.embeddings(positions, self.head_dim, dtype)  # shared by all views and blocks

        def per_view(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(scenes, views, *x.shape[1:])

        device_type = tokens.device.type

        def decoding() -> torch.autocast:
            # as the official code: matrix products in half precision, norms and the residual stream in float32
            return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

        with torch.autocast(device_type, enabled=False):
            with decoding():
                hidden = self.point_decoder(tokens, rope)
            raw = self.point_head(hidden.to(dtype), grid_h, grid_w).float()
            xy, raw_depth = raw.split([2, 1], dim=-1)
            depth = self.depth_activation(raw_depth)
            local_points = per_view(torch.cat((xy * depth, depth), dim=-1))
            with decoding():
                hidden = self.camera_decoder(tokens, rope)
            camera_poses = per_view(self.camera_head(hidden.to(dtype)))
            world_points = transform_points(camera_poses, local_points)

            global_points = None
            if self.global_points_decoder is not None:
                first_view = tokens.view(scenes, views, grid_h * grid_w, dim)[:, 0]
                with decoding():
                    hidden = self.global_points_decoder(tokens, rope, context=first_view)
                global_points = per_view(self.global_point_head(hidden.to(dtype), grid_h, grid_w).float())

            confidence = None
            if self.confidence_decoder is not None:
                with decoding():
                    hidden = self.confidence_decoder(tokens, rope)
                raw_confidence = self.confidence_head(hidden.to(dtype), grid_h, grid_w)[..., 0].float()
                confidence = per_view(self.confidence_activation(raw_confidence))

        return G2VLMReconstructionOutput(
            camera_poses=camera_poses,
            local_points=local_points,
            world_points=world_points,
            global_points=global_points,
            depth=local_points[..., 2],
            confidence=confidence,
        )


__all__ = ["G2VLMGeometryHeads"]
