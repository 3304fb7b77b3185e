"""The decode step of `generate()`, as users run it: one compiled graph, and no read back from the device.

On CUDA `generate()` compiles the decode step of a static cache with transformers' `CompileConfig`, whose default is
`fullgraph=False`: a graph break there does not raise, it silently splits the step into several graphs with Python in
between (no single CUDA graph, a host sync at the break). Compiled here with dynamo alone (backend "eager", every
other setting transformers' default) on the CPU, through `generate()` itself.

A read back to the host (`bool()`, `.item()`, `int()` of a tensor) in a decode step stalls the CPU until the GPU has
finished the step. Counted here with a `TorchFunctionMode` that sees every such call made from g2vlm_hf's code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from conftest import tiny_model
from test_attention_backends import padded_chat_inputs
from test_model import IMAGE_GRID, chat_prompt, image_patches, views
from torch.overrides import TorchFunctionMode
from transformers import CompileConfig, StaticCache

import g2vlm_hf
from g2vlm_hf.modeling.compat import cache_kwargs

PACKAGE = str(Path(g2vlm_hf.__file__).parent)
HOST_READS = {"__bool__", "item", "tolist", "__int__", "__index__", "__float__", "nonzero"}
STEPS = 6


class HostReadsFromPackage(TorchFunctionMode):
    """Records each tensor read back to the host whose caller is g2vlm_hf's code, once `counting` is set."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.counting and getattr(func, "__name__", "") in HOST_READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(str(Path(torch.__file__).parent)):
                frame = frame.f_back  # torch's own wrappers between the caller and the read
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                self.reads.append(f"{func.__name__} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


def greedy(model, **options):
    return model.generate(
        **padded_chat_inputs(), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, **options
    )


def test_generate_compiles_each_decode_step_into_one_graph():
    model = tiny_model(seed=3)
    expected = greedy(model, cache_implementation="static")  # the same cache, uncompiled (CPU)
    compile_config = CompileConfig(backend="eager")  # transformers' defaults otherwise: fullgraph=False
    compile_config._compile_all_devices = True  # compile on the CPU as on CUDA
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    actual = greedy(model, cache_implementation="static", compile_config=compile_config)
    again = greedy(model, cache_implementation="static", compile_config=compile_config)  # transformers reuses the cache
    assert dict(dynamo_utils.counters["graph_break"]) == {}
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(actual, expected) and torch.equal(again, expected)


def chat_turn(model, question_length: int, new_tokens: int, batch: int = 1, **options) -> torch.Tensor:
    """One request of a chat session: a prompt with geometry views and an image, its question `question_length`
    tokens long."""
    ids = torch.tensor([chat_prompt([1, 5], [8 + i % 50 for i in range(question_length)])] * batch)
    pixels = [image_patches(*IMAGE_GRID, seed=row) for row in range(batch)]
    return model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.cat([p for p, _ in pixels]),
        image_grid_thw=torch.cat([g for _, g in pixels]), geometry_pixel_values=views(batch=batch),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **options,
    )  # fmt: skip


def test_a_chat_session_of_new_lengths_compiles_the_decode_step_once():
    # transformers grows the static cache as requests get longer; a step compiled for the first length would compile
    # again for the second (tens of seconds on a GPU, at the second turn of every chat) and, had it specialised on the
    # length, for each request until dynamo's recompile limit (8), then run uncompiled
    turns = [(2, 6), (3, 6), (6, 10), (1, 4), (12, 20), (4, 6), (20, 24), (9, 30), (30, 8), (2, 40)]
    reference = tiny_model(seed=3)
    expected = [chat_turn(reference, *turn, cache_implementation="static") for turn in turns]  # uncompiled (CPU)
    model = tiny_model(seed=3)  # its own static cache, grown by the session's turns (`generate()` keeps it per model)
    compile_config = CompileConfig(backend="eager")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for turn, tokens in zip(turns, expected, strict=True):
        assert torch.equal(
            chat_turn(model, *turn, cache_implementation="static", compile_config=compile_config), tokens
        )
    assert dict(dynamo_utils.counters["graph_break"]) == {}
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("cache_implementation", ["static", "dynamic"])
def test_a_decode_step_reads_nothing_back_from_the_device(cache_implementation):
    model = tiny_model(seed=3)
    reads = HostReadsFromPackage()
    forwards = []

    def after_forward(module, args, kwargs, output):
        forwards.append(kwargs["input_ids"].shape[1])
        reads.counting = True  # from the end of the prefill on: prepare_inputs_for_generation, then each step

    model.register_forward_hook(after_forward, with_kwargs=True)
    with reads:
        greedy(model, cache_implementation=cache_implementation)
    assert forwards[1:] == [1] * (STEPS - 1)  # the decode steps ran, one token each
    assert reads.reads == []


def test_a_reset_static_cache_still_catches_forgotten_images():
    # transformers resets and reuses a static cache across generate() calls: a prompt whose images were forgotten
    # must fail on it as on a fresh cache
    model = tiny_model(seed=3)
    inputs = padded_chat_inputs()
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 2)
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache), use_cache=True)
        cache.reset()
        del inputs["pixel_values"], inputs["image_grid_thw"]
        with pytest.raises(ValueError, match="no `pixel_values`"):
            model(**inputs, **cache_kwargs(cache), use_cache=True)
