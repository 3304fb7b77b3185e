"""Configuration classes of G²VLM: the two-expert text decoder and the composite model."""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar, Literal

from transformers import Dinov2WithRegistersConfig, PreTrainedConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

from .geometry_losses import G2VLMGeometryLossWeights
from .head_activations import get_head_activation

GEOMETRY_ENCODER_ATTENTION_MODES = ("per_view", "official_packed_windows")
HEAD_DECODER_PRECISIONS = ("auto", "float32")
DEFAULT_GEOMETRY_LOSS_WEIGHTS = asdict(G2VLMGeometryLossWeights())  # the dataclass holds the one table

# Default encoders: those of G²VLM-2B (the Qwen2-VL-2B ViT and DINOv2-L with 4 registers).
G2VLM_2B_VISION = dict(
    depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16, patch_size=14
)
G2VLM_2B_GEOMETRY = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14, image_size=518,
    num_register_tokens=4, layer_norm_eps=1e-6, layerscale_value=1.0,
)  # fmt: skip


class G2VLMTextConfig(Qwen2VLTextConfig):
    r"""
    Configuration of the G²VLM two-expert decoder: a Qwen2-VL language model whose every layer exists twice, once for
    the semantic expert (text and Qwen2-VL image tokens) and once for the geometry expert (DINOv2 patch tokens), with
    one shared attention. All Qwen2-VL text fields keep their meaning; the multimodal RoPE sections live in
    `rope_parameters["mrope_section"]` (the official model uses `[16, 24, 24]`).

    Args:
        geometry_layer_scale_init (`float`, *optional*, defaults to 0.01):
            Initial value of the two LayerScale vectors that scale the geometry expert's attention output and MLP
            output before the residual additions.
    """

    model_type = "g2vlm_text"
    base_config_key = "text_config"
    # Tensor parallelism: both experts' projections are split over attention heads (column-wise) and joined after
    # the output projection (row-wise); the MLPs alike. Per-head QK-norm and grouped-query attention stay local.
    base_model_tp_plan: ClassVar = {
        f"layers.*.{path}": style
        for prefix in ("", "geo_")
        for path, style in (
            (f"self_attn.{prefix}q_proj", "colwise"),
            (f"self_attn.{prefix}k_proj", "colwise"),
            (f"self_attn.{prefix}v_proj", "colwise"),
            (f"self_attn.{prefix}o_proj", "rowwise"),
            (f"{prefix}mlp.{prefix}gate_proj", "colwise"),
            (f"{prefix}mlp.{prefix}up_proj", "colwise"),
            (f"{prefix}mlp.{prefix}down_proj", "rowwise"),
        )
    }

    # Defaults: the decoder of G²VLM-2B (Qwen2-VL-2B sizes).
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = 2
    rms_norm_eps: float = 1e-6
    geometry_layer_scale_init: float = 0.01

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.rope_parameters.setdefault("mrope_section", [16, 24, 24])
        head_dim = self.hidden_size // self.num_attention_heads
        if 2 * sum(self.rope_parameters["mrope_section"]) != head_dim:
            raise ValueError(
                f"rope_parameters['mrope_section']={self.rope_parameters['mrope_section']} must sum to half the head "
                f"dimension ({head_dim // 2} for hidden_size={self.hidden_size} and "
                f"num_attention_heads={self.num_attention_heads})."
            )


class G2VLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`G2VLMForConditionalGeneration`]: a Qwen2-VL semantic vision encoder, a DINOv2-with-registers
    geometry encoder, the two-expert decoder and the Pi3-style geometry heads. The defaults describe G²VLM-2B.

    Args:
        text_config (`dict` or [`G2VLMTextConfig`], *optional*):
            The two-expert decoder.
        vision_config (`dict` or [`~transformers.Qwen2VLVisionConfig`], *optional*):
            The semantic vision encoder (Qwen2-VL ViT with its 2x2 merger into the decoder width).
        geometry_config (`dict` or [`~transformers.Dinov2WithRegistersConfig`], *optional*):
            The geometry encoder (DINOv2 with registers). Only its patch tokens after the final layer norm are used.
        image_token_id (`int`, *optional*, defaults to 151655):
            Placeholder token of semantic image features (`<|image_pad|>`).
        geometry_token_id (`int`, *optional*, defaults to 151657):
            Placeholder token of geometry (DINOv2 patch) features (`<|geo_pad|>`, added by the conversion).
        vision_start_token_id (`int`, *optional*, defaults to 151652):
            `<|vision_start|>`, opening every semantic image and every geometry view.
        vision_end_token_id (`int`, *optional*, defaults to 151653):
            `<|vision_end|>`, closing every semantic image and every geometry view.
        reconstruction_prompt_ids (`list[int]`, *optional*):
            Token ids of the text that opens the official reconstruction prompt (`<|im_start|>Reconstruct the 3D
            scene.`), before the geometry block; the conversion writes them. [`G2VLMForDepthEstimation`] builds its
            prompt from them.
        geometry_encoder_attention (`str`, *optional*, defaults to `"per_view"`):
            How the geometry encoder attends. `"per_view"` is plain DINOv2: each view attends over its own CLS,
            register and patch tokens. `"official_packed_windows"` reproduces the released G²VLM code, which packs all
            views of a scene into one sequence and attends in windows of `num_patches` tokens (so windows straddle
            views and the last `5 * num_views` tokens get a zero attention output). The released weights were trained
            with it; converted official checkpoints turn it on.
        head_depth (`int`, *optional*, defaults to 5):
            Transformer blocks in each geometry-head decoder.
        head_num_attention_heads (`int`, *optional*, defaults to 16):
            Attention heads of the head decoders (their width is the decoder's `hidden_size`).
        head_mlp_ratio (`float`, *optional*, defaults to 4.0):
            MLP expansion of the head decoders.
        head_layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            LayerNorm epsilon of the head decoders.
        head_rope_theta (`float`, *optional*, defaults to 100.0):
            Base of the 2D RoPE over the patch grid in the head decoders.
        head_decoder_precision (`str`, *optional*, defaults to `"auto"`):
            Precision of the head decoders' transformer blocks. `"auto"`: as the official code runs them on a GPU,
            under autocast to the decoder's half precision when the model runs in bfloat16/float16, in float32
            otherwise. `"float32"`: always in float32 (slower on a GPU). Either way the weights stay in float32, and
            the output heads (points, camera, confidence), the depth exponential, the pose SVD and every output are
            float32.
        point_head_hidden_size (`int`, *optional*, defaults to 1024):
            Output width of the point, global-point and confidence decoders.
        camera_head_hidden_size (`int`, *optional*, defaults to 512):
            Output width of the camera decoder and width of the camera head.
        use_global_points (`bool`, *optional*, defaults to `True`):
            Whether the global-points decoder (cross-attending to the first view) and its head exist.
        use_confidence_head (`bool`, *optional*, defaults to `False`):
            Whether a confidence decoder and its 1-channel head exist (only some official checkpoints have one).
        depth_activation (`str`, *optional*, defaults to `"exp"`):
            Activation of the point head's depth channel (`"exp"`: the head predicts log depth, as G²VLM and Pi3).
            One of the names of `head_activations.HEAD_ACTIVATIONS`.
        confidence_activation (`str`, *optional*, defaults to `"linear"`):
            Activation of the confidence head (`"linear"`: G²VLM's unnormalised scores).
        geometry_loss_weights (`dict`, *optional*):
            Weights of the reconstruction losses used with `geometry_targets`: `local_points` (1.0),
            `global_points` (1.0), `camera` (0.2) and, inside the camera term, `camera_translation` (100.0) — the
            official recipe — plus `confidence` (0.05) and its `confidence_threshold` (0.02) with a confidence head.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embedding matrix.
    """

    model_type = "g2vlm"
    sub_configs_defaults: ClassVar = {
        "text_config": G2VLMTextConfig,
        "vision_config": Qwen2VLVisionConfig,
        "geometry_config": Dinov2WithRegistersConfig,
    }
    keys_to_ignore_at_inference: ClassVar = ["past_key_values"]

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    geometry_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    geometry_token_id: int = 151657
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    reconstruction_prompt_ids: list[int] | None = None
    geometry_encoder_attention: Literal["per_view", "official_packed_windows"] = "per_view"
    head_depth: int = 5
    head_num_attention_heads: int = 16
    head_mlp_ratio: float = 4.0
    head_layer_norm_eps: float = 1e-6
    head_rope_theta: float = 100.0
    head_decoder_precision: Literal["auto", "float32"] = "auto"
    point_head_hidden_size: int = 1024
    camera_head_hidden_size: int = 512
    use_global_points: bool = True
    use_confidence_head: bool = False
    depth_activation: str = "exp"
    confidence_activation: str = "linear"
    geometry_loss_weights: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Missing encoders default to those of G²VLM-2B (transformers would build its own classes' defaults).
        if self.vision_config is None and "vision_config" in self.sub_configs_defaults:
            self.vision_config = Qwen2VLVisionConfig(**G2VLM_2B_VISION)
        if isinstance(self.vision_config, dict) and "vision_config" not in self.sub_configs_defaults:
            self.vision_config = Qwen2VLVisionConfig(**self.vision_config)
        if self.geometry_config is None:
            self.geometry_config = Dinov2WithRegistersConfig(**G2VLM_2B_GEOMETRY)
        super().__post_init__(**kwargs)
        self.geometry_loss_weights = {**DEFAULT_GEOMETRY_LOSS_WEIGHTS, **(self.geometry_loss_weights or {})}
        unknown = set(self.geometry_loss_weights) - set(DEFAULT_GEOMETRY_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(
                f"geometry_loss_weights has unknown term(s) {sorted(unknown)}; the terms are "
                f"{sorted(DEFAULT_GEOMETRY_LOSS_WEIGHTS)}."
            )
        if self.geometry_encoder_attention not in GEOMETRY_ENCODER_ATTENTION_MODES:
            raise ValueError(
                f"geometry_encoder_attention={self.geometry_encoder_attention!r} is not supported; choose one of "
                f"{GEOMETRY_ENCODER_ATTENTION_MODES}."
            )
        if self.head_decoder_precision not in HEAD_DECODER_PRECISIONS:
            raise ValueError(
                f"head_decoder_precision={self.head_decoder_precision!r} is not supported; choose one of "
                f"{HEAD_DECODER_PRECISIONS}."
            )
        for name in (self.depth_activation, self.confidence_activation):
            get_head_activation(name)  # a ValueError naming the choices
        if self.text_config.hidden_size % self.head_num_attention_heads:
            raise ValueError(
                f"The geometry-head decoders run at the decoder width ({self.text_config.hidden_size}), which must be "
                f"divisible by head_num_attention_heads={self.head_num_attention_heads}."
            )
        if self.vision_config is not None and self.vision_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size={self.vision_config.hidden_size} (the ViT merger's output width) must equal "
                f"text_config.hidden_size={self.text_config.hidden_size}."
            )

    @property
    def geometry_patch_size(self) -> int:
        """Side in pixels of one geometry (DINOv2) patch; geometry images must be multiples of it."""
        return self.geometry_config.patch_size


class G2VLMReconstructionConfig(G2VLMConfig):
    r"""
    Configuration of [`G2VLMForReconstruction`]: G²VLM without the semantic vision encoder and the LM head, for users
    who only want 3D. Same fields as [`G2VLMConfig`]; `vision_config` is optional and unused.
    """

    model_type = "g2vlm_reconstruction"
    # No semantic encoder: `vision_config` stays None unless given (then it is kept, unused).
    sub_configs_defaults: ClassVar = {
        "text_config": G2VLMTextConfig,
        "geometry_config": Dinov2WithRegistersConfig,
    }


__all__ = ["G2VLMConfig", "G2VLMReconstructionConfig", "G2VLMTextConfig"]
