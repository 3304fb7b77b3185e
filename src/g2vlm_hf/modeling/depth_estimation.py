"""G²VLM as a transformers depth estimator: `AutoModelForDepthEstimation` and `pipeline("depth-estimation")`."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import DepthEstimatorOutput

from .configuration_g2vlm import G2VLMConfig
from .geometry_heads import G2VLMGeometryHeads
from .modeling_g2vlm import G2VLMModel, reconstruct_scenes
from .outputs import G2VLMReconstructionOutput
from .pretrained import FULL_PRECISION_MODULES, G2VLMPreTrainedModel


@dataclass
class G2VLMDepthEstimatorOutput(DepthEstimatorOutput):
    r"""
    predicted_depth (`torch.FloatTensor` of shape `(scenes * views, H, W)`):
        Depth along each camera's z axis of every view of every scene, in order (scene 0's views first), at the
        geometry views' size, in the model's (not metric-guaranteed) units.
    reconstruction (`G2VLMReconstructionOutput`):
        The whole reconstruction the depth comes from (poses, point maps, intrinsics, confidence).
    """

    reconstruction: G2VLMReconstructionOutput | None = None


class G2VLMForDepthEstimation(G2VLMPreTrainedModel):
    """G²VLM's reconstruction path (geometry encoder, two-expert decoder, geometry heads) with the depth-estimation
    interface of transformers. Loads from a converted G²VLM folder (the semantic encoder's and LM head's weights are
    not needed and not loaded); its inputs are what the G²VLM geometry image processor (`AutoImageProcessor` of the
    folder) returns. Several views of one scene are reconstructed together: pass them as one scene,
    `image_processor([views])`."""

    config: G2VLMConfig
    _keep_in_fp32_modules = FULL_PRECISION_MODULES
    _keep_in_fp32_modules_strict = ["geometry_heads"]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^model\.visual\."]

    def __init__(self, config: G2VLMConfig):
        super().__init__(config)
        self.model = G2VLMModel(config)
        self.model.visual = None  # semantic images never enter depth estimation
        self.geometry_heads = G2VLMGeometryHeads(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(
        self,
        geometry_pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> G2VLMDepthEstimatorOutput:
        """
        Args:
            geometry_pixel_values (`(scenes, views, 3, H, W)`): the views, from the geometry image processor.
            input_ids (`(scenes, length)`): the reconstruction prompt, from the same processor.
            attention_mask (`(scenes, length)`, *optional*).

        Returns:
            [`G2VLMDepthEstimatorOutput`] with `predicted_depth` `(scenes * views, H, W)` and the `reconstruction`.
        """
        reconstruction = reconstruct_scenes(
            self.model, self.geometry_heads, input_ids, geometry_pixel_values, attention_mask, **kwargs
        )
        depth = reconstruction.depth
        return G2VLMDepthEstimatorOutput(
            predicted_depth=depth.reshape(-1, *depth.shape[-2:]), reconstruction=reconstruction
        )


__all__ = ["G2VLMDepthEstimatorOutput", "G2VLMForDepthEstimation"]
