"""Chunked reconstruction end to end on the converted official tiny checkpoint: a long sequence runs chunk by chunk
with consistent shapes and the geometry invariants, and the merge is the model's own per-chunk output, moved."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURE_DIR
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from g2vlm_hf import reconstruct_chunked
from g2vlm_hf.chunked import (
    LoopClosureConfig,
    close_loops,
    merge_chunks,
    stream_reconstruction,
    transform_reconstruction,
)

NUM_VIEWS, CHUNK, OVERLAP, WIDTH = 120, 16, 4, 56


def sliding_views(count: int) -> list[Image.Image]:
    """`count` crops of the fixture's views sliding sideways: neighbours overlap, as video frames do."""
    sources = [Image.open(FIXTURE_DIR / "images" / f"view_{index}.png").convert("RGB") for index in range(3)]
    return [sources[(index // 40) % 3].crop((x := (index * 6) % 236, 0, x + 800, 280)) for index in range(count)]


@pytest.fixture(scope="module")
def model_and_processor(converted_tiny):
    return AutoModelForImageTextToText.from_pretrained(converted_tiny).eval(), AutoProcessor.from_pretrained(
        converted_tiny
    )


def one_pass(model, processor, views):
    with torch.inference_mode():
        return model.reconstruct(**processor(geometry_images=views, return_tensors="pt", target_width=WIDTH))


def test_a_long_sequence_runs_in_chunks(model_and_processor):
    model, processor = model_and_processor
    views = sliding_views(NUM_VIEWS)
    chunks = list(stream_reconstruction(model, processor, iter(views), CHUNK, OVERLAP, target_width=WIDTH))
    merged = merge_chunks(chunks)

    height = merged.world_points.shape[2]
    assert merged.camera_poses.shape == (1, NUM_VIEWS, 4, 4)
    for name in ("local_points", "world_points", "global_points"):
        assert getattr(merged, name).shape == (1, NUM_VIEWS, height, WIDTH, 3)
    assert merged.depth.shape == (1, NUM_VIEWS, height, WIDTH)
    assert merged.intrinsics.shape == (1, NUM_VIEWS, 3, 3)
    assert [index for chunk in chunks for index in chunk.view_indices] == list(range(NUM_VIEWS))
    assert all(chunk.reconstruction.camera_poses.device.type == "cpu" for chunk in chunks)

    rotations = merged.camera_poses[0, :, :3, :3]
    torch.testing.assert_close(
        rotations @ rotations.transpose(1, 2), torch.eye(3).expand(NUM_VIEWS, 3, 3), atol=1e-5, rtol=0
    )
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(NUM_VIEWS), atol=1e-5)
    world = (
        torch.einsum("nij,nhwj->nhwi", rotations, merged.local_points[0]) + merged.camera_poses[0, :, None, None, :3, 3]
    )
    torch.testing.assert_close(world, merged.world_points[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged.depth, merged.local_points[..., 2])
    assert all(chunk.alignment_error is not None and chunk.alignment_error < float("inf") for chunk in chunks[1:])

    # the first chunk is the frame: exactly the one-pass reconstruction of its views
    first = one_pass(model, processor, views[:CHUNK])
    torch.testing.assert_close(merged.camera_poses[:, :CHUNK], first.camera_poses)
    torch.testing.assert_close(merged.world_points[:, :CHUNK], first.world_points)
    # a later chunk: the one-pass reconstruction of its views moved by that chunk's similarity, new views only
    second = chunks[2]
    start = second.view_indices.start - OVERLAP
    moved = transform_reconstruction(
        one_pass(model, processor, views[start : second.view_indices.stop]), second.similarity
    )
    torch.testing.assert_close(
        merged.camera_poses[:, second.view_indices], moved.camera_poses[:, OVERLAP:], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(merged.depth[:, second.view_indices], moved.depth[:, OVERLAP:], atol=1e-4, rtol=1e-4)


def test_a_short_sequence_is_one_pass(model_and_processor):
    model, processor = model_and_processor
    views = sliding_views(10)
    merged = reconstruct_chunked(model, processor, views, chunk_size=16, overlap=4, target_width=WIDTH)
    expected = one_pass(model, processor, views)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(merged, name), value)


def test_loop_closure_end_to_end(model_and_processor):
    pytest.importorskip("scipy", reason="loop closure needs scipy (the loop extra, part of the test extras)")
    model, processor = model_and_processor
    views, chunk, overlap = sliding_views(40), 8, 2
    chunks = list(
        stream_reconstruction(model, processor, views, chunk, overlap, describe_views=True, target_width=WIDTH)
    )
    # the descriptors are the geometry encoder's patch tokens of each view, mean-pooled and normalised
    inputs = processor(geometry_images=views[:chunk], return_tensors="pt", target_width=WIDTH)
    with torch.inference_mode():
        tokens = model.model.geometry_encoder(inputs["geometry_pixel_values"].flatten(0, 1), views_per_scene=chunk)
    expected = torch.nn.functional.normalize(tokens.float().mean(dim=1), dim=-1)
    torch.testing.assert_close(chunks[0].descriptors, expected, atol=1e-5, rtol=1e-5)
    assert torch.cat([c.descriptors for c in chunks]).shape == (40, tokens.shape[-1])

    # random weights: accept any candidate, so that pair chunks and the pose graph run
    config = LoopClosureConfig(similarity_threshold=-1.0, min_separation=16, max_loops=2,
                               max_alignment_error=float("inf"), min_co_visible=0.0)  # fmt: skip
    closed, loops = close_loops(model, processor, views, chunks, config, target_width=WIDTH)
    assert len(loops) == 2 and all(loop.candidate.second - loop.candidate.first >= 16 for loop in loops)
    merged = merge_chunks(closed)
    assert merged.camera_poses.shape == (1, 40, 4, 4) and merged.world_points.shape[:2] == (1, 40)
    for name in ("camera_poses", "world_points", "local_points", "depth"):
        assert getattr(merged, name).isfinite().all(), name
    rotations = merged.camera_poses[0, :, :3, :3]
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(40, 3, 3), atol=1e-4, rtol=0)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(40), atol=1e-4)
    world = (
        torch.einsum("nij,nhwj->nhwi", rotations, merged.local_points[0]) + merged.camera_poses[0, :, None, None, :3, 3]
    )
    torch.testing.assert_close(world, merged.world_points[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(merged.depth, merged.local_points[..., 2])
