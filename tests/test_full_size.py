"""The port at the official full size (Qwen2-VL-2B decoder x2, ViT-600M, DINOv2-L, Pi3 heads), on the meta device:
every official key maps to a parameter of the same shape and the parameter counts agree."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import KEYS_2B_FILE

from g2vlm_hf import G2VLMForConditionalGeneration
from g2vlm_hf.conversion import config_from_official, expected_state_dict_shapes, map_official_keys

FULL_SIZE_TOKEN_IDS = dict(
    image=151655, geometry=151657, vision_start=151652, vision_end=151653, bos=151644, eos=151645, pad=151643
)


@pytest.fixture(scope="module")
def official_2b() -> dict:
    return json.loads(KEYS_2B_FILE.read_text())


@pytest.fixture(scope="module")
def full_size_config(official_2b):
    configs = official_2b["configs"]
    return config_from_official(
        configs["text_config"],
        configs["vit_config"],
        configs["dino_config"],
        token_ids=FULL_SIZE_TOKEN_IDS,
        use_confidence_head=False,
    )


def test_every_official_key_maps_to_a_parameter_of_the_same_shape(official_2b, full_size_config):
    official_shapes = {key: tuple(entry["shape"]) for key, entry in official_2b["keys"].items()}
    expected = expected_state_dict_shapes(full_size_config)
    mapping = map_official_keys(official_shapes, expected)  # raises, naming keys, on any mismatch
    assert len(mapping) == official_2b["num_keys"] == len(expected)
    assert len(set(mapping.values())) == len(mapping)


def test_parameter_count_equals_official(official_2b, full_size_config):
    with torch.device("meta"):
        model = G2VLMForConditionalGeneration(full_size_config)
    assert (
        sum(parameter.numel() for parameter in model.parameters()) == official_2b["total_parameters"] == 4_538_215_076
    )
