"""G²VLM as a transformers depth estimator: `AutoModelForDepthEstimation` and `pipeline("depth-estimation")`."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import DepthEstimatorOutput

from .configuration_g2vlm import G2VLMConfig
from .geometry_heads import G2VLMGeometryHeads
from .modeling_g2vlm import G2VLMModel, as_geometry_pixel_values, reconstruct_scenes
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
    interface of transformers: it takes the views alone, from the G²VLM geometry image processor
    (`AutoImageProcessor` of the folder), and builds the official reconstruction prompt itself. Loads from a converted
    G²VLM folder (the semantic encoder's and LM head's weights are not needed and not loaded). Several views of one
    scene are reconstructed together: pass them as one scene, `image_processor([views])`."""

    config: G2VLMConfig
    _keep_in_fp32_modules = FULL_PRECISION_MODULES
    _keep_in_fp32_modules_strict = ["geometry_heads"]
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^model\.visual\."]

    def __init__(self, config: G2VLMConfig):
        super().__init__(config)
        self.model = G2VLMModel(config, with_semantic_encoder=False)  # semantic images never enter depth estimation
        self.geometry_heads = G2VLMGeometryHeads(config).float()  # float32 whatever the default dtype
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def reconstruction_prompt(self, geometry_pixel_values: torch.Tensor) -> torch.LongTensor:
        """`(scenes, length)` token ids of the official reconstruction prompt of `(scenes, views, 3, H, W)` views: the
        text of `config.reconstruction_prompt_ids`, then each view's geometry tokens between vision markers."""
        prefix = self.config.reconstruction_prompt_ids
        if prefix is None:
            raise ValueError(
                "The config has no `reconstruction_prompt_ids` (a folder converted by an older g2vlm-hf): convert the "
                "checkpoint again with `g2vlm-convert`, or set `model.config.reconstruction_prompt_ids = "
                "tokenizer.encode(g2vlm_hf.processing.RECONSTRUCTION_PROMPT, add_special_tokens=False)`."
            )
        scenes, views, _, height, width = geometry_pixel_values.shape
        patch = self.config.geometry_patch_size
        view = [
            self.config.vision_start_token_id,
            *[self.config.geometry_token_id] * ((height // patch) * (width // patch)),
            self.config.vision_end_token_id,
        ]
        return torch.tensor([[*prefix, *view * views]] * scenes, device=geometry_pixel_values.device)

    def forward(self, geometry_pixel_values: torch.Tensor, **kwargs) -> G2VLMDepthEstimatorOutput:
        """
        Args:
            geometry_pixel_values (`(scenes, views, 3, H, W)`): the views, from the geometry image processor.

        Returns:
            [`G2VLMDepthEstimatorOutput`] with `predicted_depth` `(scenes * views, H, W)` and the `reconstruction`.
        """
        views = as_geometry_pixel_values(geometry_pixel_values, self.config.geometry_patch_size)
        input_ids = self.reconstruction_prompt(views)
        reconstruction = reconstruct_scenes(self.model, self.geometry_heads, input_ids, views, **kwargs)
        depth = reconstruction.depth
        return G2VLMDepthEstimatorOutput(
            predicted_depth=depth.reshape(-1, *depth.shape[-2:]), reconstruction=reconstruction
        )


__all__ = ["G2VLMDepthEstimatorOutput", "G2VLMForDepthEstimation"]
