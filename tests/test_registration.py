"""The package registers G2VLM with transformers' Auto classes on import, idempotently."""

from __future__ import annotations

from conftest import tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    Dinov2WithRegistersConfig,
    Qwen2VLVisionConfig,
)

import g2vlm_hf
from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration, G2VLMReconstructionConfig


def test_default_config_is_g2vlm_2b():
    config = G2VLMConfig()
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (1536, 28)
    assert (config.vision_config.hidden_size, config.geometry_config.hidden_size) == (1536, 1024)
    assert (config.vision_config.depth, config.geometry_config.num_hidden_layers) == (32, 24)
    assert config.vision_config.hidden_act == "quick_gelu" and config.geometry_config.num_register_tokens == 4


def test_sub_configs_given_as_dicts_keep_their_classes_defaults():
    config = G2VLMConfig(vision_config={"depth": 2, "hidden_size": 1536}, geometry_config={"hidden_size": 64})
    assert config.vision_config.depth == 2 and config.vision_config.embed_dim == Qwen2VLVisionConfig().embed_dim
    assert config.geometry_config.num_register_tokens == Dinov2WithRegistersConfig().num_register_tokens


def test_reconstruction_config_has_no_semantic_encoder_unless_given():
    assert G2VLMReconstructionConfig().vision_config is None
    full = G2VLMConfig().to_dict()
    assert isinstance(G2VLMReconstructionConfig(**full).vision_config, Qwen2VLVisionConfig)


def test_register_is_idempotent():
    g2vlm_hf.register()
    g2vlm_hf.register()
    assert isinstance(AutoConfig.for_model("g2vlm"), G2VLMConfig)


def test_auto_classes_build_the_g2vlm_models():
    config = tiny_config()
    assert type(AutoModelForImageTextToText.from_config(config)) is G2VLMForConditionalGeneration
    # AutoModel gives the full model (chat + reconstruction), not the headless backbone
    assert type(AutoModel.from_config(config)) is G2VLMForConditionalGeneration


def test_config_round_trips_through_auto_config(tmp_path):
    config = tiny_config(geometry_encoder_attention="official_packed_windows")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, G2VLMConfig)
    drop_path = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}
    assert drop_path(loaded.to_dict()) == drop_path(config.to_dict())
    assert loaded.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
