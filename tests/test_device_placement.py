"""Every tensor the model makes on its own (masks, positions, packed runs, block masks, caches) is made on its inputs'
device, never on torch's default device.

On CUDA a forgotten `device=` puts a tensor on the CPU beside CUDA inputs: an error, or a silent copy each step. The
CPU tests cannot see that, since both devices are the CPU there. So these tests run the model on the CPU with the
default device set to "meta": a tensor made without its inputs' device is then a meta tensor, and meeting a CPU tensor
raises ("Tensor on device meta is not on the expected device cpu"). Each run must also equal the same run made without
that default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_attention_backends import flash_attention_stand_in, padded_chat_inputs
from test_finetuning import synthetic_batch
from test_model import GRID_H, GRID_W, VIEWS, geometry_block, views
from transformers import StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf import G2VLMForDepthEstimation
from g2vlm_hf.modeling.intrinsics import rescale_intrinsics
from g2vlm_hf.modeling.varlen_attention import varlen_runs

# the flash path runs on the CPU with its stand-in (packed runs through a varlen kernel written in PyTorch)
BACKENDS = ["eager", "sdpa", "flex_attention", "flash_attention_2"]


@pytest.fixture
def model_on(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in())

    def build(implementation: str):
        model = tiny_model(seed=3)  # its parameters and buffers on the CPU, made before the default changes
        model.config.text_config._attn_implementation_internal = implementation
        return model

    return build


def as_is_and_under_meta_default(run: Callable[[], Any]) -> tuple[Any, Any]:
    """`run()` as it is, then again with torch's default device set to meta."""
    expected = run()
    with torch.device("meta"):
        return expected, run()


def test_the_meta_default_catches_a_tensor_made_without_its_inputs_device():
    # the premise of this file: under the meta default, a factory without `device=` meets CPU tensors and fails
    inputs = torch.arange(4)
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta"):
        _ = inputs <= torch.arange(4)
    with torch.device("meta"):
        assert (inputs <= torch.arange(4, device=inputs.device)).all()


def test_the_packed_runs_are_made_on_the_masks_device():
    # the default device does not reach into an operator's body: the model tests above cannot see it, so the
    # operator's function is run here. Row 0: one padded key, past 2, text then a block then text; row 1: a block
    key_valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()
    block_ids = torch.tensor([[-1, 0, 0, -1, -1], [1, 1, 1, -1, -1]])
    expected, packed = as_is_and_under_meta_default(lambda: varlen_runs(key_valid, block_ids))
    assert {tensor.device.type for tensor in packed} == {"cpu"}
    torch.testing.assert_close(packed, expected)


def reconstruction_inputs() -> dict:
    ids = [1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]
    return dict(
        input_ids=torch.tensor([ids, [0, 0, *ids[2:]]]),  # row 1 left-padded
        attention_mask=torch.tensor([[1] * len(ids), [0, 0] + [1] * (len(ids) - 2)]),
        geometry_pixel_values=views(batch=2),
    )


@pytest.mark.parametrize("implementation", BACKENDS)
def test_a_padded_chat_forward_and_a_reconstruction_make_their_tensors_on_the_inputs_device(implementation, model_on):
    model = model_on(implementation)
    chat, scenes = padded_chat_inputs(), reconstruction_inputs()
    unpadded = {name: inputs[:1] for name, inputs in scenes.items() if name != "attention_mask"}

    def run() -> list[torch.Tensor]:
        padded, single = model.reconstruct(**scenes), model.reconstruct(**unpadded)
        size = (GRID_H * 14, GRID_W * 14)
        resized = rescale_intrinsics(single.intrinsics, size, (2 * size[0], 3 * size[1]))
        return [model(**chat).logits, *padded.to_tuple(), *single.to_tuple(), resized]  # every field set

    with torch.no_grad():
        expected, actual = as_is_and_under_meta_default(run)
    assert {output.device.type for output in actual} == {"cpu"}
    torch.testing.assert_close(actual, expected)


def test_depth_estimation_makes_its_prompt_on_the_inputs_device():
    model = G2VLMForDepthEstimation(tiny_config(reconstruction_prompt_ids=[1, 5])).eval()
    scenes = views()
    with torch.no_grad():
        expected, actual = as_is_and_under_meta_default(lambda: model(geometry_pixel_values=scenes).predicted_depth)
    assert actual.device.type == "cpu"
    torch.testing.assert_close(actual, expected)


def test_a_training_step_with_geometry_targets_makes_its_tensors_on_the_inputs_device():
    # the language loss and every geometry loss term, then their gradients
    batch = synthetic_batch()

    def step(default_device: str) -> tuple[dict, torch.Tensor]:
        model = tiny_model(seed=3).train()
        with torch.device(default_device):
            output = model(**batch)
            output.loss.backward()
        losses = {"loss": output.loss, "lm_loss": output.lm_loss}
        return {**losses, **output.geometry_losses}, model.geometry_heads.camera_head.fc_t.weight.grad

    expected_losses, expected_gradient = step("cpu")
    losses, gradient = step("meta")
    assert losses.keys() == expected_losses.keys() and len(losses) > 3
    torch.testing.assert_close(losses, expected_losses)
    torch.testing.assert_close(gradient, expected_gradient)
    assert gradient.abs().sum() > 0


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_generation_makes_its_tensors_on_the_inputs_device(implementation, cache, model_on):
    # the prompt (image blocks: the packed runs or query slices), then decode steps with their cache and masks
    model = model_on(implementation)
    inputs = padded_chat_inputs()
    settings = dict(max_new_tokens=4, do_sample=False)

    def cache_settings() -> dict:
        if cache == "dynamic":
            return {}
        # transformers' StaticCache makes a counter without a device when built (moved at its first update), so the
        # cache is built before the default changes: what is under test is what the model makes
        length = inputs["input_ids"].shape[1] + settings["max_new_tokens"]
        return dict(past_key_values=StaticCache(config=model.config, max_cache_len=length))

    with torch.no_grad():
        expected = model.generate(**inputs, **settings, **cache_settings())
        static = cache_settings()
        with torch.device("meta"):
            generated = model.generate(**inputs, **settings, **static)
    assert torch.equal(generated, expected)
    if cache == "static":
        assert static["past_key_values"].layers[0].keys.device.type == "cpu"


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_a_hand_written_decode_step_and_a_prompt_of_embeddings_make_their_tensors_on_the_inputs_device(
    implementation, model_on
):
    # what generate() hands over itself, a user's own loop leaves to the model: positions after the cache, the
    # layout of a prompt given as embeddings, the text model's own positions
    model = model_on(implementation)
    inputs = padded_chat_inputs()
    ids = inputs.pop("input_ids")

    def run() -> list[torch.Tensor]:
        prompt = model(input_ids=ids, **inputs, use_cache=True)
        step = model(
            input_ids=prompt.logits[:, -1:].argmax(-1),
            attention_mask=torch.nn.functional.pad(inputs["attention_mask"], (0, 1), value=1),
            past_key_values=prompt.past_key_values,
        )
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, **inputs)
        text_only = model.model.language_model(inputs_embeds=embeds)
        return [step.logits, from_embeds.logits, text_only.last_hidden_state]

    with torch.no_grad():
        expected, actual = as_is_and_under_meta_default(run)
    torch.testing.assert_close(actual, expected)
