"""Fast decoding by default: on CUDA `generate()` picks a static cache (which transformers compiles), unless the user
chose; the CUDA device is simulated on the CPU by patching the device test, so the static cache really runs here."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_attention_backends import padded_chat_inputs
from transformers import DynamicCache, GenerationConfig, StaticCache

from g2vlm_hf.modeling import generation_defaults


@pytest.fixture
def on_cuda(monkeypatch):
    """generate() believes the model is on CUDA (the only device test the default makes)."""
    monkeypatch.setattr(generation_defaults, "runs_on_cuda", lambda model: True)


def generated(model, **kwargs):
    options = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True) | kwargs
    output = model.generate(**padded_chat_inputs(), **options)
    cache = output.get("cache") if output.get("cache") is not None else output.get("past_key_values")
    return output.sequences, cache


def test_on_cuda_greedy_and_sampling_get_a_static_cache_with_the_same_tokens(on_cuda):
    model = tiny_model(seed=5)
    tokens, cache = generated(model)
    assert isinstance(cache, StaticCache)
    expected, dynamic = generated(model, cache_implementation="dynamic")  # the user's explicit choice wins
    assert isinstance(dynamic, DynamicCache) and not isinstance(dynamic, StaticCache)
    assert torch.equal(tokens, expected)
    torch.manual_seed(0)
    _, sampled = generated(model, do_sample=True, top_k=5)
    assert isinstance(sampled, StaticCache)


def test_on_cuda_the_static_cache_is_one_transformers_compiles(on_cuda, monkeypatch):
    model = tiny_model()
    _, cache = generated(model)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert model._valid_auto_compile_criteria({"cache": cache, "past_key_values": cache}, GenerationConfig())


def test_the_user_choice_and_other_modes_keep_their_cache(on_cuda):
    model = tiny_model()
    _, beams = generated(model, num_beams=2)
    assert isinstance(beams, DynamicCache)
    model.generation_config.cache_implementation = "dynamic"
    _, configured = generated(model)
    assert isinstance(configured, DynamicCache)


def test_on_the_cpu_nothing_changes():
    _, cache = generated(tiny_model())
    assert isinstance(cache, DynamicCache)
