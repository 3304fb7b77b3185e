"""The `PreTrainedModel` base of every G²VLM model class: capability flags, weight initialisation and the
tensor-parallel guard."""

import math

from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .compat import HubKernelsOnRequest
from .configuration_g2vlm import G2VLMConfig
from .layers import G2VLMLayerScale
from .torch_varlen import LocalFlashAttentionMixin

# The parts whose precision the 3D outputs depend on, small beside the decoder: never quantized (transformers'
# quantizers, bitsandbytes and torchao among them, skip `_keep_in_fp32_modules`) and loaded in float32 when the rest
# is loaded in float16. Names (or name patterns) from the task models' root. The heads are float32 in bfloat16 too:
# the task models list them in `_keep_in_fp32_modules_strict`, and transformers wants a module in only one of the two lists, so here they
# appear through their parts, "geometry_heads.*" (the pattern form quantizers and the loader accept), which keeps the
# quantizers off them.
FULL_PRECISION_MODULES = ["geometry_heads.*", "model.geometry_encoder", "model.geometry_projector"]


# Hub kernels only when asked (compat.py); flash_attention_2 without the flash-attn package runs on torch's varlen
# kernel instead of a Hub download (torch_varlen.py).
class G2VLMPreTrainedModel(LocalFlashAttentionMixin, HubKernelsOnRequest, PreTrainedModel):
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
    # False on purpose. transformers reads this flag only in `is_backend_compatible()`, which is what vLLM's and
    # SGLang's transformers backends check before running a model with their own attention: they would give every
    # token plain causal attention without G2VLM's mask (image and geometry blocks are bidirectional) and have no slot
    # for the geometry views. So they refuse G2VLM ("not compatible"); README "Serving" says what serves it.
    # transformers' own attention functions (eager, sdpa, flash, flex, registered ones) are not affected.
    _supports_attention_backend = False
    _supports_flash_attn = True  # image blocks go through varlen calls (varlen_attention.py)
    _supports_flex_attn = True  # prompts with images: a BlockMask from the prefix layout (flex.py), never dense
    # A decode step with a static cache compiles as one graph for every backend (tests/test_compile.py); the prompt
    # (prefill) with images still syncs with the host to lay out its image blocks.
    _can_compile_fullgraph = True

    def _flash_attn_can_dispatch(self, flash_attn_version: int, is_init_check: bool = False) -> bool:
        try:
            return super()._flash_attn_can_dispatch(flash_attn_version, is_init_check)
        except (ImportError, ValueError) as error:
            raise type(error)(
                f"{error} G2VLM also runs with attn_implementation='sdpa' (the default; CPU and GPU), "
                "'flex_attention' (PyTorch's flex attention) or 'eager' (the reference)."
            ) from error

    @classmethod
    def maybe_distribute_model(cls, model: nn.Module, distributed_config, mesh_manager):
        """Refuses a tensor-parallel degree that would split attention heads (the plan shards whole heads)."""
        tp_size = getattr(distributed_config, "tp_size", None) or 1
        text = model.config.text_config
        if tp_size > 1 and (text.num_attention_heads % tp_size or text.num_key_value_heads % tp_size):
            raise ValueError(
                f"Tensor parallelism over {tp_size} processes would split attention heads: the decoder has "
                f"{text.num_attention_heads} query and {text.num_key_value_heads} key-value heads, and the degree must "
                "divide both. Start fewer processes per model (torchrun --nproc_per_node), e.g. "
                f"{math.gcd(text.num_attention_heads, text.num_key_value_heads)}."
            )
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, G2VLMLayerScale):
            init.constant_(module.gamma, module.init_value)


__all__ = ["FULL_PRECISION_MODULES", "G2VLMPreTrainedModel"]
