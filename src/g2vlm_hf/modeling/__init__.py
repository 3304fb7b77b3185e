"""G²VLM configuration and model classes."""

from .configuration_g2vlm import G2VLMConfig, G2VLMReconstructionConfig, G2VLMTextConfig
from .depth_estimation import G2VLMDepthEstimatorOutput, G2VLMForDepthEstimation
from .modeling_g2vlm import G2VLMForConditionalGeneration, G2VLMForReconstruction, G2VLMModel
from .outputs import G2VLMCausalLMOutputWithPast, G2VLMModelOutputWithPast, G2VLMReconstructionOutput
from .pretrained import G2VLMPreTrainedModel
from .text_decoder import G2VLMTextModel

__all__ = [
    "G2VLMCausalLMOutputWithPast",
    "G2VLMConfig",
    "G2VLMDepthEstimatorOutput",
    "G2VLMForConditionalGeneration",
    "G2VLMForDepthEstimation",
    "G2VLMForReconstruction",
    "G2VLMModel",
    "G2VLMModelOutputWithPast",
    "G2VLMPreTrainedModel",
    "G2VLMReconstructionConfig",
    "G2VLMReconstructionOutput",
    "G2VLMTextConfig",
    "G2VLMTextModel",
]
