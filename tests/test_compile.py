"""`torch.compile(fullgraph=True)`: a graph break raises. Compiled here with dynamo alone (backend="eager"), which is
where graph breaks arise; each compiled call is checked against the uncompiled one.

- a decode step with a static cache, for every backend (the flash path with its CPU stand-ins);
- the prefill of a reconstruction prompt (a geometry block), heads included, for sdpa, eager and the varlen path;
- `G2VLMModel.forward` on a chat prompt holding a geometry block and an image block (vision tower run beforehand);
- the whole chat prefill: its only graph breaks are in transformers' Qwen2-VL vision tower (its per-image loops);
- the reconstruction prefill of the varlen path through inductor (compiled code, symbolic sizes), as users compile.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import Call, recording, tiny_model
from test_attention_backends import flash_attention_stand_in, reference_varlen_attention, varlen_queries_per_layer
from test_model import GRID_H, GRID_W, IMAGE_GRID, VIEWS, chat_prompt, geometry_block, image_patches, views
from transformers import StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from g2vlm_hf.modeling.compat import cache_kwargs

BACKENDS = ["sdpa", "eager", "flash_attention_2"]


# The CPU reference kernel as an operator, as flash-attn registers `flash_attn_varlen_func`'s kernel. Its calls are
# recorded when it runs, compiled or not (tracing runs the fake below), in VARLEN_RUNS.
VARLEN_RUNS: list[Call] = []
compiled_reference_varlen = torch.library.custom_op("g2vlm_tests::reference_varlen_attention", mutates_args=())(
    recording(reference_varlen_attention, VARLEN_RUNS)
)


@compiled_reference_varlen.register_fake
def _(q, *args, **kwargs):
    return torch.empty_like(q)


@pytest.fixture
def model_with(monkeypatch):
    """A tiny model on `implementation`; the flash path runs on the CPU with its stand-ins (see
    test_attention_backends), the varlen one registered as an operator like flash-attn's."""
    monkeypatch.setitem(
        ALL_ATTENTION_FUNCTIONS, "flash_attention_2", flash_attention_stand_in(compiled_reference_varlen)
    )

    def build(implementation: str):
        model = tiny_model()
        model.config.text_config._attn_implementation_internal = implementation
        assert model._can_compile_fullgraph
        return model

    return build


def chat_inputs() -> dict:
    pixels, grid = image_patches(*IMAGE_GRID)
    return dict(
        input_ids=torch.tensor([chat_prompt([1, 5], [8, 9])]), pixel_values=pixels, image_grid_thw=grid,
        geometry_pixel_values=views(),
    )  # fmt: skip


@pytest.mark.parametrize("implementation", BACKENDS)
def test_a_static_cache_decode_step_compiles_without_graph_breaks(implementation, model_with):
    model = model_with(implementation)
    prompt = chat_inputs()
    length = prompt["input_ids"].shape[1]

    def prefill() -> StaticCache:
        cache = StaticCache(config=model.config, max_cache_len=length + 4)
        prefill.rope_deltas = model(**prompt, **cache_kwargs(cache), use_cache=True).rope_deltas
        return cache

    def step(token: torch.Tensor, position: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        return model(input_ids=token, position_ids=position, **cache_kwargs(cache), use_cache=True).logits

    token = torch.tensor([[11]])
    with torch.no_grad():
        cache = prefill()
        position = (length + prefill.rope_deltas).view(1, 1, 1).expand(3, 1, 1)  # the next M-RoPE position
        expected = step(token, position, cache)
        compiled = torch.compile(step, fullgraph=True, backend="eager")
        actual = compiled(token, position, prefill())
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("implementation", BACKENDS)
def test_a_reconstruction_prefill_compiles_without_graph_breaks(implementation, model_with):
    model = model_with(implementation)
    # two scenes, one of them left-padded: positions, blocks, expert routing and the heads' token grid in one graph
    ids = [1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]
    input_ids = torch.tensor([ids, [0, 0, *ids[2:]]])
    attention_mask = torch.tensor([[1] * len(ids), [0, 0] + [1] * (len(ids) - 2)])
    scenes = views(batch=2)

    def reconstruct(input_ids, attention_mask, scenes):
        output = model.reconstruct(input_ids=input_ids, attention_mask=attention_mask, geometry_pixel_values=scenes)
        return output.world_points, output.camera_poses

    with torch.no_grad():
        expected = reconstruct(input_ids, attention_mask, scenes)
        VARLEN_RUNS.clear()
        actual = torch.compile(reconstruct, fullgraph=True, backend="eager")(input_ids, attention_mask, scenes)
    torch.testing.assert_close(actual, expected)
    if implementation == "flash_attention_2":  # the compiled graph ran every valid token through the varlen kernel
        layers = model.config.text_config.num_hidden_layers
        assert varlen_queries_per_layer(VARLEN_RUNS) == [int(attention_mask.sum())] * layers


@pytest.mark.parametrize("implementation", BACKENDS)
def test_the_chat_prefill_of_a_geometry_and_an_image_block_compiles(implementation, model_with, monkeypatch):
    # G2VLMModel.forward itself, fullgraph: embeddings, geometry encoder, positions, attention blocks, expert
    # split, every layer's shared attention. Only transformers' semantic vision tower, which breaks graphs (see
    # the next test), is run beforehand and its output handed back by `get_image_features`.
    model = model_with(implementation)
    inputs = chat_inputs()
    with torch.no_grad():
        expected = model.model(**inputs, use_cache=False).last_hidden_state
        image_outputs = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        )
    monkeypatch.setattr(model.model, "get_image_features", lambda *args, **kwargs: image_outputs)
    with torch.no_grad():
        compiled = torch.compile(model.model, fullgraph=True, backend="eager")
        actual = compiled(**inputs, use_cache=False).last_hidden_state
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_the_chat_prefill_breaks_graphs_only_in_the_semantic_vision_tower(implementation, model_with):
    model = model_with(implementation)
    model.model.visual.config._attn_implementation_internal = "sdpa"  # the vision tower's own loops under test
    inputs = chat_inputs()
    with torch.no_grad():
        explanation = torch._dynamo.explain(lambda **kw: model(**kw, use_cache=False).logits)(**inputs)
    frames = [reason.user_stack[-1] for reason in explanation.break_reasons]
    assert frames, "transformers' vision tower was expected to break graphs (per-image loops)"
    in_g2vlm = [f"{frame.filename}:{frame.lineno}" for frame in frames if "/g2vlm_hf/" in frame.filename]
    # the one allowed: splitting the image features per image in get_image_features, as transformers' Qwen2-VL does
    assert all("modeling_g2vlm.py" in where for where in in_g2vlm) and len(in_g2vlm) <= 1, in_g2vlm


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize(
    "text_prefix",
    [[1, 5], []],
    ids=["text-then-views", "views-only"],  # views only: no causal run, that group holds just its sentinel segment
)
def test_the_varlen_reconstruction_prefill_compiles_with_inductor(model_with, text_prefix):
    # the packed runs have sizes known only at run time: inductor generates code for symbolic sizes
    model = model_with("flash_attention_2")
    input_ids = torch.tensor([[*text_prefix, *geometry_block(VIEWS, GRID_H, GRID_W)]])
    scenes = views()

    def reconstruct(input_ids, scenes):
        return model.reconstruct(input_ids=input_ids, geometry_pixel_values=scenes).world_points

    with torch.no_grad():
        expected = reconstruct(input_ids, scenes)
        VARLEN_RUNS.clear()
        actual = torch.compile(reconstruct, fullgraph=True)(input_ids, scenes)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # the compiled code ran every token through the varlen kernel, at every layer
    layers = model.config.text_config.num_hidden_layers
    assert varlen_queries_per_layer(VARLEN_RUNS) == [input_ids.shape[1]] * layers
