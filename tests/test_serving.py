"""Serving engines' transformers backends must refuse G2VLM instead of running it wrong.

vLLM and SGLang run a transformers model "as a backend" when its class says `is_backend_compatible()` (transformers:
`_supports_attention_backend`); they then give every token their own causal attention, without G2VLM's mask
(bidirectional image and geometry blocks), and have no input for the geometry views. Neither engine is installed here:
`engine_model_class` follows what vLLM's registry (`_try_resolve_transformers`) and SGLang's model loader do to find
the class they check, from a folder staged for the Hub (the class comes from its remote code, as for an engine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers import dynamic_module_utils as dynamic_modules

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import fast_tiny_copy, model_outputs

from g2vlm_hf import (
    G2VLMForConditionalGeneration,
    G2VLMForDepthEstimation,
    G2VLMForReconstruction,
    G2VLMModel,
    G2VLMTextModel,
)
from g2vlm_hf.conversion import write_remote_code


def engine_model_class(folder: Path) -> type:
    """The class an engine's transformers backend checks: the architecture's transformers class, else the remote
    code's `AutoModel` from the config's `auto_map`."""
    config = json.loads((folder / "config.json").read_text())
    [architecture] = config["architectures"]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        model_class = dynamic_modules.get_class_from_dynamic_module(config["auto_map"]["AutoModel"], str(folder))
    return model_class


def engine_accepts(model_class: type) -> bool:
    """What both engines ask before running a model with their attention (`model_impl="transformers"` raises
    "not compatible" when this is False; "auto" falls back to no implementation)."""
    return model_class.is_backend_compatible()


@pytest.mark.parametrize(
    "model_class",
    [G2VLMForConditionalGeneration, G2VLMModel, G2VLMForReconstruction, G2VLMForDepthEstimation, G2VLMTextModel],
)
def test_every_model_class_says_it_is_not_backend_compatible(model_class):
    assert not engine_accepts(model_class)


@pytest.fixture
def staged(converted_tiny, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = fast_tiny_copy(converted_tiny, tmp_path / "staged")
    write_remote_code(folder)
    return folder


def test_the_remote_code_an_engine_loads_says_so_too(staged):
    model_class = engine_model_class(staged)
    assert model_class.__module__.startswith("transformers_modules.")  # the Hub copy, not the package
    assert model_class.__name__ == "G2VLMForConditionalGeneration" and not engine_accepts(model_class)


def test_transformers_itself_still_runs_every_attention_function(staged):
    """The flag is only what engines read: transformers' own attention functions keep working."""
    processor = AutoProcessor.from_pretrained(staged)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = AutoModelForImageTextToText.from_pretrained(
            staged, dtype=torch.float32, attn_implementation=implementation
        ).eval()
        assert model.config._attn_implementation == implementation
        outputs[implementation] = model_outputs(processor, model)
    assert torch.equal(outputs["eager"]["generated"], outputs["sdpa"]["generated"])
    torch.testing.assert_close(outputs["eager"]["logits"], outputs["sdpa"]["logits"], rtol=1e-4, atol=1e-4)
