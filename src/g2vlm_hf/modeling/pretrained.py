"""The `PreTrainedModel` base of every G²VLM model class: capability flags and weight initialisation."""

from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_g2vlm import G2VLMConfig
from .layers import G2VLMLayerScale


class G2VLMPreTrainedModel(PreTrainedModel):
    config: G2VLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "G2VLMDecoderLayer",
        "Qwen2VLVisionBlock",
        "Dinov2WithRegistersLayer",
        "G2VLMHeadBlock",
        "G2VLMHeadCrossBlock",
    ]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # flash-attention and flex need the block-aware dispatch of the attention-kernels work; until then they are off.
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, G2VLMLayerScale):
            init.constant_(module.gamma, module.init_value)


__all__ = ["G2VLMPreTrainedModel"]
