"""g2vlm-hf: G²VLM as a Hugging Face transformers model. Importing the package registers it with the Auto classes."""

from .chunked import reconstruct_chunked, stream_reconstruction
from .modeling import (
    G2VLMCausalLMOutputWithPast,
    G2VLMConfig,
    G2VLMDepthEstimatorOutput,
    G2VLMForConditionalGeneration,
    G2VLMForDepthEstimation,
    G2VLMForReconstruction,
    G2VLMModel,
    G2VLMModelOutputWithPast,
    G2VLMPreTrainedModel,
    G2VLMReconstructionConfig,
    G2VLMReconstructionOutput,
    G2VLMTextConfig,
    G2VLMTextModel,
)
from .processing import G2VLMGeometryImageProcessor, G2VLMProcessor
from .registration import register

register()

__version__ = "0.1.0"

__all__ = [
    "G2VLMCausalLMOutputWithPast",
    "G2VLMConfig",
    "G2VLMDepthEstimatorOutput",
    "G2VLMForConditionalGeneration",
    "G2VLMForDepthEstimation",
    "G2VLMForReconstruction",
    "G2VLMGeometryImageProcessor",
    "G2VLMModel",
    "G2VLMModelOutputWithPast",
    "G2VLMPreTrainedModel",
    "G2VLMProcessor",
    "G2VLMReconstructionConfig",
    "G2VLMReconstructionOutput",
    "G2VLMTextConfig",
    "G2VLMTextModel",
    "reconstruct_chunked",
    "register",
    "stream_reconstruction",
]
