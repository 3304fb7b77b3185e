"""Processors of G²VLM: tokenizer + semantic image processor + geometry image processor + chat template."""

from .chat_template import CHAT_TEMPLATE, RECONSTRUCTION_PROMPT
from .image_io import load_image
from .image_processing_geometry import G2VLMGeometryImageProcessor, G2VLMGeometryImagesKwargs
from .processing_g2vlm import G2VLMProcessor, G2VLMProcessorKwargs

__all__ = [
    "CHAT_TEMPLATE",
    "RECONSTRUCTION_PROMPT",
    "G2VLMGeometryImageProcessor",
    "G2VLMGeometryImagesKwargs",
    "G2VLMProcessor",
    "G2VLMProcessorKwargs",
    "load_image",
]
