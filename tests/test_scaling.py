"""Scaling past one device: big-model inference with CPU/disk offload, and the tensor-parallel plan."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_model
from test_full_size import FULL_SIZE_TOKEN_IDS, official_2b  # noqa: F401  (fixture)
from test_model import chat_and_reconstruction_inputs
from transformers import AutoModelForImageTextToText, DistributedConfig

from g2vlm_hf import G2VLMForConditionalGeneration
from g2vlm_hf.conversion import config_from_official


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    model = tiny_model(seed=7)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("offload_folder", [True, False], ids=["offload_folder", "safetensors_in_place"])
def test_offloaded_model_gives_the_same_generation_and_reconstruction(saved_tiny, tmp_path, offload_folder):
    model, folder = saved_tiny
    # without an offload folder, transformers 5 offloads to the checkpoint's own safetensors files (no error)
    offloaded = AutoModelForImageTextToText.from_pretrained(
        folder,
        device_map="auto",
        max_memory={"cpu": "2MB"},
        offload_folder=tmp_path / "offload" if offload_folder else None,
    )
    assert {"cpu", "disk"} <= set(offloaded.hf_device_map.values())
    # no placement splits a decoder layer (both experts + their shared attention), an encoder block or a head block
    placed = list(offloaded.hf_device_map)
    assert not any(re.search(r"layers\.\d+\.(self_attn|mlp|geo_mlp)", name) for name in placed), placed
    assert not any(re.search(r"(blocks|layer)\.\d+\.\w+", name) for name in placed), placed
    chat, recon = chat_and_reconstruction_inputs()
    with torch.no_grad():
        assert torch.equal(
            offloaded.generate(**chat, max_new_tokens=5, do_sample=False),
            model.generate(**chat, max_new_tokens=5, do_sample=False),
        )
        torch.testing.assert_close(
            offloaded.reconstruct(**recon).world_points, model.reconstruct(**recon).world_points, rtol=0, atol=0
        )


def test_tensor_parallel_plan_covers_both_experts_and_shards_evenly(official_2b):  # noqa: F811
    configs = official_2b["configs"]
    config = config_from_official(
        configs["text_config"], configs["vit_config"], configs["dino_config"], token_ids=FULL_SIZE_TOKEN_IDS,
        use_confidence_head=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = G2VLMForConditionalGeneration(config)
    plan = model._tp_plan
    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        regex = re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")
        matched = [name for name in modules if regex.match(name)]
        assert matched, f"TP plan entry {pattern!r} matches no module"
        for name in matched:
            # column-wise splits the output features, row-wise the input features; over 2 ranks, whole heads each
            shape = modules[name].weight.shape
            assert shape[0 if style.startswith("colwise") else 1] % 2 == 0, (name, style, tuple(shape))
    text = config.text_config
    # the degree must split whole query and key-value heads: 2 is the largest for the 2B (12 and 2 heads)
    assert text.num_attention_heads % 2 == 0 and text.num_key_value_heads % 2 == 0
    planned = {re.sub(r"\.\d+\.", ".*.", name) for name in modules}
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        for prefix in ("", "geo_"):
            assert f"model.language_model.layers.*.self_attn.{prefix}{leaf}" in plan
    assert "model.language_model.layers.*.geo_mlp.geo_down_proj" in planned
    assert plan["model.language_model.layers.*.geo_mlp.geo_down_proj"] == "rowwise"
    assert plan["lm_head"] == "colwise_gather_output"


def test_a_tensor_parallel_degree_that_splits_heads_is_refused_before_anything_is_sharded():
    model = tiny_model()  # 4 query heads, 2 key-value heads
    with pytest.raises(ValueError, match=r"over 4 processes would split attention heads.*4 query and 2 key-value"):
        G2VLMForConditionalGeneration.maybe_distribute_model(model, DistributedConfig(tp_size=4), mesh_manager=None)
    # a degree dividing both head counts goes on to transformers (which, with no device mesh, leaves the model as is)
    assert G2VLMForConditionalGeneration.maybe_distribute_model(model, DistributedConfig(tp_size=2), None) is model
