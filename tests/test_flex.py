"""flex_attention never falls back: a dozen prompt layouts in one process (views, prefixes, padding, batch sizes)
stay under dynamo's recompile limit, which is made to raise here instead of silently running flex uncompiled (the
dense fallback: 80 GiB at 16 views on a GPU), every chunk with image blocks goes through the compiled flex call (not
the package's own fallback to sdpa by query slices, which equals eager too), and every output equals eager."""

from __future__ import annotations

import torch
import torch._dynamo
from conftest import geometry_block, tiny_model
from test_model import GRID_H, GRID_W

from g2vlm_hf.modeling import text_decoder

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
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for shape in SHAPES:
        inputs = layout_inputs(*shape)
        with torch.no_grad():
            actual, expected = flex.reconstruct(**inputs), reference.reconstruct(**inputs)
        torch.testing.assert_close(actual.world_points, expected.world_points, rtol=1e-4, atol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    assert fell_back == [], "flex fell back to sdpa by query slices"
    assert 1 <= graphs <= 4, f"{graphs} graphs compiled for {len(SHAPES)} shapes"
