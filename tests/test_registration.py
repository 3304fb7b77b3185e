"""The package registers G2VLM with transformers' Auto classes on import, idempotently."""

from __future__ import annotations

from conftest import tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

import g2vlm_hf
from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration, G2VLMModel


def test_default_config_is_g2vlm_2b():
    config = G2VLMConfig()
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (1536, 28)
    assert (config.vision_config.hidden_size, config.geometry_config.hidden_size) == (1536, 1024)


def test_register_is_idempotent():
    g2vlm_hf.register()
    g2vlm_hf.register()
    assert isinstance(AutoConfig.for_model("g2vlm"), G2VLMConfig)


def test_auto_classes_build_the_g2vlm_models():
    config = tiny_config()
    assert type(AutoModelForImageTextToText.from_config(config)) is G2VLMForConditionalGeneration
    assert type(AutoModel.from_config(config)) is G2VLMModel


def test_config_round_trips_through_auto_config(tmp_path):
    config = tiny_config(geometry_encoder_attention="official_packed_windows")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, G2VLMConfig)
    drop_path = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}
    assert drop_path(loaded.to_dict()) == drop_path(config.to_dict())
    assert loaded.text_config.rope_parameters["mrope_section"] == [4, 6, 6]
