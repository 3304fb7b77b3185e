"""Registration of the G²VLM classes with the transformers Auto factories."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import (
    G2VLMConfig,
    G2VLMForConditionalGeneration,
    G2VLMForDepthEstimation,
    G2VLMForReconstruction,
    G2VLMReconstructionConfig,
    G2VLMTextConfig,
    G2VLMTextModel,
)
from .processing import G2VLMGeometryImageProcessor, G2VLMProcessor

_registered = False


def register() -> None:
    """Register the configs, models and processors with AutoConfig, AutoModel, AutoModelForImageTextToText,
    AutoModelForDepthEstimation, AutoImageProcessor (the geometry image processor) and AutoProcessor.

    Idempotent: called on `import g2vlm_hf`, safe to call again.
    """
    global _registered
    if _registered:
        return
    AutoConfig.register(G2VLMConfig.model_type, G2VLMConfig, exist_ok=True)
    AutoConfig.register(G2VLMTextConfig.model_type, G2VLMTextConfig, exist_ok=True)
    AutoConfig.register(G2VLMReconstructionConfig.model_type, G2VLMReconstructionConfig, exist_ok=True)
    # AutoModel gives the model that can both chat and reconstruct (not the headless backbone, which has neither
    # the LM head nor the geometry heads): `AutoModel.from_pretrained(converted)` then loads every weight.
    AutoModel.register(G2VLMConfig, G2VLMForConditionalGeneration, exist_ok=True)
    AutoModel.register(G2VLMReconstructionConfig, G2VLMForReconstruction, exist_ok=True)
    AutoModel.register(G2VLMTextConfig, G2VLMTextModel, exist_ok=True)
    AutoModelForImageTextToText.register(G2VLMConfig, G2VLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(G2VLMConfig, G2VLMProcessor, exist_ok=True)
    AutoProcessor.register(G2VLMReconstructionConfig, G2VLMProcessor, exist_ok=True)
    AutoModelForDepthEstimation.register(G2VLMConfig, G2VLMForDepthEstimation, exist_ok=True)
    for config_class in (G2VLMConfig, G2VLMReconstructionConfig):
        AutoImageProcessor.register(config_class, slow_image_processor_class=G2VLMGeometryImageProcessor, exist_ok=True)
    _registered = True
