"""What a sampled mutation pass over modeling_g2vlm.py found unpinned: that reconstruction, which reads nothing back
from a key/value cache, builds none (transformers' `use_cache=False` convention); that `forward` returns the semantic
image features it computed (as `get_image_features` gives them); and that geometry views of the wrong rank or channel
count are refused with the message naming the expected shape rather than failing deep inside the encoder."""

from __future__ import annotations

import pytest
import torch
from conftest import geometry_block, image_block, image_patches, tiny_model, tiny_reconstruction_model

GRID_H, GRID_W, VIEWS = 2, 2, 2  # geometry views of 28x28 pixels


def scene() -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        input_ids=torch.tensor([[1, 5, *geometry_block(VIEWS, GRID_H, GRID_W)]]),
        geometry_pixel_values=torch.randn(1, VIEWS, 3, GRID_H * 14, GRID_W * 14, generator=generator),
    )


@pytest.mark.parametrize("build", [tiny_model, tiny_reconstruction_model], ids=["chat-model", "reconstruction-model"])
def test_reconstruction_builds_no_key_value_cache(build):
    """A reconstruction is one pass whose cache nobody reads: the decoder runs with `use_cache=False` and so, as
    transformers' decoders do, returns no cache, although the config's `use_cache` (True) would otherwise make one
    holding the keys and values of every layer for every view."""
    model = build()
    assert model.config.text_config.use_cache
    outputs = []
    model.model.language_model.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model.reconstruct(**scene())
    assert len(outputs) == 1
    assert outputs[0].past_key_values is None


def test_forward_returns_the_image_features_it_computed():
    """`image_outputs` of a call with semantic images are those images' features as `get_image_features` gives them
    (one merged block per image, in order); a call without images returns none."""
    model = tiny_model()
    first, second = image_patches(4, 4, seed=1), image_patches(4, 2, seed=2)
    pixels, grids = torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
    ids = torch.tensor([[1, 5, *image_block(4, 4), 6, *image_block(4, 2), 7]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grids)
        direct = model.model.get_image_features(pixels, grids)
        text_only = model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert [block.shape[0] for block in out.image_outputs.pooler_output] == [4, 2]
    for got, expected in zip(out.image_outputs.pooler_output, direct.pooler_output, strict=True):
        torch.testing.assert_close(got, expected)
    assert text_only.image_outputs is None


@pytest.mark.parametrize(
    "shape", [(VIEWS, 3, 28, 28), (1, VIEWS, 1, 28, 28)], ids=["views-without-a-batch", "one-channel-views"]
)
def test_views_of_the_wrong_rank_or_channels_are_refused_with_the_expected_shape(shape):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"must have shape \(batch_size, num_views, 3, height, width\)"):
        model.reconstruct(input_ids=scene()["input_ids"], geometry_pixel_values=torch.zeros(shape))
