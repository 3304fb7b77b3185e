"""Output classes of the G²VLM models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput

# The G²VLM outputs extend transformers' own, so that the cache field carries the installed release's name
# (`past_key_values` up to 5.23, `cache` from 5.24) and everything transformers does with its outputs applies.


@dataclass
class G2VLMModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Final hidden states, each token normed by its expert's final norm.
    rope_deltas (`torch.LongTensor` of shape `(batch_size, 1)`, *optional*):
        Offset between a text token's sequence index and its multimodal RoPE position after the prompt.
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        The semantic vision tower's output for the images of this call (`get_image_features`).
    """

    rope_deltas: torch.LongTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class G2VLMCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Causal language-modelling loss (with `labels`) plus the total geometry loss (with `geometry_targets`).
    rope_deltas (`torch.LongTensor` of shape `(batch_size, 1)`, *optional*):
        Offset between a text token's sequence index and its multimodal RoPE position after the prompt.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The language-modelling part of `loss`.
    geometry_losses (`dict[str, torch.FloatTensor]`, *optional*):
        The named reconstruction losses (`local_points`, `global_points`, `camera_translation`, `camera_rotation`,
        `camera`, `confidence` when there is a confidence head) and their weighted `total`, with `geometry_targets`.
    reconstruction (`G2VLMReconstructionOutput`, *optional*):
        The geometry heads' predictions the geometry losses were computed on.
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        The semantic vision tower's output for the images of this call (`get_image_features`).
    """

    rope_deltas: torch.LongTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    geometry_losses: dict[str, torch.FloatTensor] | None = None
    reconstruction: G2VLMReconstructionOutput | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class G2VLMReconstructionOutput(ModelOutput):
    r"""
    3D reconstruction of each scene, in one world frame per scene chosen by the model, at the model's (unknown,
    not metric-guaranteed) scale. All tensors are float32. `H` and `W` are the geometry image sizes in pixels
    (multiples of the patch size).

    camera_poses (`torch.FloatTensor` of shape `(batch_size, num_views, 4, 4)`):
        Camera-to-world transforms: rotation (orthonormal, det +1) and translation, last row `[0, 0, 0, 1]`.
    local_points (`torch.FloatTensor` of shape `(batch_size, num_views, H, W, 3)`):
        Per-pixel 3D points in each camera's frame (x right, y down, z forward); z is the depth.
    world_points (`torch.FloatTensor` of shape `(batch_size, num_views, H, W, 3)`):
        `local_points` moved to the world frame by `camera_poses`.
    global_points (`torch.FloatTensor` of shape `(batch_size, num_views, H, W, 3)`, *optional*):
        Point maps predicted directly by the global-points head (which cross-attends to the first view), without
        going through the camera poses.
    depth (`torch.FloatTensor` of shape `(batch_size, num_views, H, W)`):
        Positive depth along each camera's z axis (`local_points[..., 2]`).
    confidence (`torch.FloatTensor` of shape `(batch_size, num_views, H, W)`, *optional*):
        Unnormalised per-pixel confidence (higher is more reliable); None when the checkpoint has no confidence head.
    intrinsics (`torch.FloatTensor` of shape `(batch_size, num_views, 3, 3)`, *optional*):
        Pinhole intrinsics `[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]` of each view in pixels of the `W x H` geometry
        views (pixel centres at half-integers), fitted in closed form to `local_points` over the valid pixels (the
        more confident half when there is `confidence`). `g2vlm_hf.modeling.intrinsics.rescale_intrinsics` maps them
        to the original image size. None in the `reconstruction` of a training forward (`geometry_targets`), which
        does not fit them.
    """

    camera_poses: torch.FloatTensor | None = None
    local_points: torch.FloatTensor | None = None
    world_points: torch.FloatTensor | None = None
    global_points: torch.FloatTensor | None = None
    depth: torch.FloatTensor | None = None
    confidence: torch.FloatTensor | None = None
    intrinsics: torch.FloatTensor | None = None
