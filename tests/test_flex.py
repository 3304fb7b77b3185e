"""flex_attention never falls back: a dozen prompt layouts in one process (views, prefixes, padding, batch sizes)
stay under dynamo's recompile limit, which is made to raise here instead of silently running flex uncompiled (the
dense fallback: 80 GiB at 16 views on a GPU), every chunk with image blocks goes through the compiled flex call (not
the package's own fallback to sdpa by query slices, which equals eager too), and every output equals eager."""

from __future__ import annotations

import torch
import torch._dynamo
from conftest import geometry_block, tiny_model
from test_model import GRID_H, GRID_W
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from g2vlm_hf.modeling import text_decoder
from g2vlm_hf.modeling.flex import _flex_call, flex_length

SHAPES = [  # (views, text tokens before the views, left padding of a second row or None)
    (2, 2, None), (3, 2, None), (2, 5, 2), (4, 3, 3), (5, 2, None), (6, 4, 1),
    (7, 2, None), (3, 6, 4), (8, 3, None), (9, 2, 2), (2, 9, None), (10, 3, 3),
]  # fmt: skip


def layout_inputs(views: int, prefix: int, padding: int | None) -> dict:
    ids = [1] * prefix + geometry_block(views, GRID_H, GRID_W) + [8, 9]
    rows = [ids] if padding is None else [ids, [0] * padding + ids[padding:]]
    generator = torch.Generator().manual_seed(views * 10 + prefix)
    scenes = torch.randn(len(rows), views, 3, GRID_H * 14, GRID_W * 14, generator=generator)
    mask = torch.tensor([[int(token != 0) for token in row] for row in rows])
    return dict(input_ids=torch.tensor(rows), attention_mask=mask, geometry_pixel_values=scenes)


@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_a_dozen_prompt_shapes_stay_compiled_and_equal_eager(monkeypatch):
    torch._dynamo.reset()
    fell_back = []
    query_chunks = text_decoder.attend_query_chunks

    def spy(*args, **kwargs):
        fell_back.append(1)
        return query_chunks(*args, **kwargs)

    monkeypatch.setattr(text_decoder, "attend_query_chunks", spy)
    flex, reference = tiny_model(seed=3), tiny_model(seed=3)
    flex.set_attn_implementation("flex_attention")
    reference.set_attn_implementation("eager")
    buckets = set()  # (batch size, padded length): a graph of the package's flex call each at most
    for shape in SHAPES:
        inputs = layout_inputs(*shape)
        buckets.add((inputs["input_ids"].shape[0], flex_length(inputs["input_ids"].shape[1])))
        with torch.no_grad():
            actual, expected = flex.reconstruct(**inputs), reference.reconstruct(**inputs)
        torch.testing.assert_close(actual.world_points, expected.world_points, rtol=1e-4, atol=1e-4)
    assert fell_back == [], "flex fell back to sdpa by query slices"
    # the graphs compiled for the package's own flex call (none if it ran uncompiled), apart from any other graph
    graphs = len(_debug_get_cache_entry_list(_flex_call.__code__))
    assert 1 <= graphs <= len(buckets), f"{graphs} graphs of the flex call for {len(SHAPES)} shapes"
