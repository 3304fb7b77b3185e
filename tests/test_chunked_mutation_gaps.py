"""Parts of chunked reconstruction (`g2vlm_hf.chunked`) that mutation testing found unchecked: the settings checked
before any model pass (chunking, scipy), the default chunk plan, the smallest alignment sample, non-finite points left
out of the alignment error, the clear error when the shared views cannot be fitted, what each streamed chunk hands out
besides its reconstruction (its views' pixels and descriptors), the merge of chunks whose fields or view sizes differ,
and loop closure on no or one chunk, between two chunks, and on a pair chunk of another view size. The stand-in
models are those of `test_chunked` and `synthetic_trajectories`; every expected value follows from their known
geometry."""

from __future__ import annotations

import sys

import pytest
import torch
from synthetic_trajectories import LoopTrajectory, StandInModel, relative_ate
from synthetic_trajectories import index_processor as loop_processor
from test_chunked import FakeModel, Walk, index_processor, world_from
from transformers.utils import logging

from g2vlm_hf.chunked import (
    ChunkAligner,
    LoopClosureConfig,
    ReconstructedChunk,
    close_loops,
    merge_chunks,
    reconstruct_chunked,
    stream_reconstruction,
)
from g2vlm_hf.loop_closure import record_view_descriptors
from g2vlm_hf.modeling.outputs import G2VLMReconstructionOutput
from g2vlm_hf.similarity import Similarity


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def predict(model, views) -> G2VLMReconstructionOutput:
    """One pass of a stand-in model over `views` (indices)."""
    return model.reconstruct(index_processor(list(views))["geometry_pixel_values"])


def as_chunk(index: int, views: range, output: G2VLMReconstructionOutput) -> ReconstructedChunk:
    pixels = torch.zeros(1, len(views), 3, 1, 1)
    return ReconstructedChunk(index, views, output, pixels, Similarity.identity(), None)


# ------------------------------------------------------------------------------------------- settings and inputs


@pytest.mark.parametrize(("chunk_size", "overlap"), [(4, 4), (4, 5)])
def test_bad_chunking_of_a_sized_sequence_is_refused_before_any_pass(chunk_size, overlap):
    """With a sequence the number of chunks (for the progress bar) is worked out first; an overlap as long as the chunk
    must be refused as such there, not fail dividing by the chunk's new views, and before the model runs."""
    model = FakeModel(Walk(10))
    with pytest.raises(ValueError, match=f"less than chunk_size={chunk_size}, got {overlap}"):
        list(stream_reconstruction(model, index_processor, range(10), chunk_size, overlap))
    assert model.frames == []


def test_three_alignment_points_suffice_and_non_integers_are_refused():
    """3 points (the fewest that fix a similarity) is the smallest sample allowed, and on an exact chain it aligns every
    chunk exactly; a count that is not an integer is refused however large."""
    walk = Walk(10)
    model = FakeModel(walk)
    merged = merge_chunks(stream_reconstruction(model, index_processor, range(10), 4, 2, max_alignment_points=3))
    expected = model.frames[0].apply_to_poses(walk.poses)
    torch.testing.assert_close(merged.camera_poses[0].double(), expected, atol=1e-3 * model.frames[0].scale, rtol=1e-4)
    for bad in (3.5, 20_000.0, "100"):
        with pytest.raises(ValueError, match=r"max_alignment_points must be an integer of at least 3"):
            ChunkAligner(bad)
    assert ChunkAligner(3).max_points == 3


def test_shared_views_without_usable_points_give_a_clear_error():
    """When the points of the shared views cannot be fitted (here: all of the new chunk's are NaN), the error names the
    alignment of the chunk, and keeps the fit's own reason."""
    model = FakeModel(Walk(10))
    first, second = predict(model, range(0, 6)), predict(model, range(4, 10))
    second.world_points[:, :2] = float("nan")  # the two views it shares with the first chunk
    aligner = ChunkAligner()
    aligner.add(first, 0)
    with pytest.raises(
        ValueError, match="Cannot align a chunk to the previous one through their shared views: Only 0"
    ) as caught:
        aligner.add(second, 2)
    assert isinstance(caught.value.__cause__, ValueError)


def test_loop_closure_without_scipy_fails_before_the_model_runs(monkeypatch):
    """The scipy check of `reconstruct_chunked(..., loop_closure=True)` comes before the stream: no model pass is
    wasted on a run that cannot finish."""
    monkeypatch.setitem(sys.modules, "scipy", None)
    model = StandInModel(LoopTrajectory(40))
    with pytest.raises(ImportError, match=r'pip install "g2vlm-hf\[loop\]"'):
        reconstruct_chunked(model, loop_processor, range(40), 16, 4, loop_closure=True)
    assert model.calls == []


# ------------------------------------------------------------------------------------------------ streamed chunks


class CallRecorder(FakeModel):
    """The stand-in model, remembering the views of each pass."""

    def __init__(self, walk: Walk):
        super().__init__(walk)
        self.calls: list[list[int]] = []

    def reconstruct(self, geometry_pixel_values, **kwargs):
        self.calls.append(geometry_pixel_values[0, :, 0, 0, 0].long().tolist())
        return super().reconstruct(geometry_pixel_values, **kwargs)


def test_the_default_chunks_are_32_views_sharing_8():
    """Without settings a pass takes 32 views, the next one starts 8 views before the end of the previous one, and the
    last is filled back to 32 views; the same in the stream and in `reconstruct_chunked`."""
    walk = Walk(60)
    expected = [list(range(0, 32)), list(range(24, 56)), list(range(28, 60))]
    streamed = CallRecorder(walk)
    chunks = list(stream_reconstruction(streamed, index_processor, range(60)))
    assert streamed.calls == expected and [chunk.view_indices for chunk in chunks] == [
        range(0, 32),
        range(32, 56),
        range(56, 60),
    ]
    merged = CallRecorder(walk)
    assert reconstruct_chunked(merged, index_processor, range(60)).camera_poses.shape[1] == 60
    assert merged.calls == expected


def test_the_alignment_error_leaves_out_non_finite_points():
    """Pixels without a finite point in either chunk (sky, invalid depth) are left out of the fit and of the reported
    error: an exact chain with a few of them still aligns with an error of about 0, not NaN or a failure."""
    walk = Walk(10)
    model = FakeModel(walk)
    first, second = predict(model, range(0, 6)), predict(model, range(4, 10))
    first.world_points[0, 4, 0, :3] = float("nan")  # shared view 4, as the first chunk has it
    second.world_points[0, 1, 2, 5] = float("inf")  # shared view 5, as the second chunk has it
    aligner = ChunkAligner()
    aligner.add(first, 0)
    aligned, _, error = aligner.add(second, 2)
    assert 0 <= error < 1e-5
    finite = aligned.world_points[0, 1:].isfinite().all(-1)  # views 5..9 as the new chunk has them
    truth = model.frames[0].apply(world_from(walk.poses[5:10], walk.local[5:10]))
    torch.testing.assert_close(aligned.world_points[0, 1:][finite].double(), truth[finite],
                               atol=1e-4 * model.frames[0].scale, rtol=1e-4)  # fmt: skip


def test_each_chunk_hands_out_the_pixels_and_descriptors_of_its_own_new_views():
    """A streamed chunk carries the processor's pixels and the encoder's descriptors of exactly the views it is the
    first to reconstruct (`view_indices`), in order: the views it shares with the chunk before are cut from both, as
    from its reconstruction."""
    num_views = 40
    model = StandInModel(LoopTrajectory(num_views))
    chunks = list(stream_reconstruction(model, loop_processor, range(num_views), 16, 4, describe_views=True))
    with record_view_descriptors(model) as recorded:  # every view described in one pass
        model.reconstruct(loop_processor(list(range(num_views)))["geometry_pixel_values"])
    every_view = torch.cat(recorded)
    for chunk in chunks:
        views = list(chunk.view_indices)
        assert chunk.geometry_pixel_values.shape[1] == chunk.reconstruction.world_points.shape[1] == len(views)
        assert chunk.geometry_pixel_values[0, :, 0, 0, 0].long().tolist() == views  # the view index rides in the pixels
        torch.testing.assert_close(chunk.descriptors, every_view[views])
    assert [view for chunk in chunks for view in chunk.view_indices] == list(range(num_views))


# ------------------------------------------------------------------------------------------------------ the merge


def test_a_field_missing_from_any_chunk_is_none_in_the_merge():
    """The merge concatenates the fields every chunk has, view after view; a field one chunk lacks (here the
    confidence), whether the first or a later one, is None in the merge rather than an error."""
    walk = Walk(8)
    model = FakeModel(walk)
    with_confidence = predict(FakeModel(walk, flag_outliers=True), range(0, 4))
    without = predict(model, range(4, 8))
    assert with_confidence.confidence is not None and without.confidence is None
    for parts in ((with_confidence, without), (without, with_confidence)):
        merged = merge_chunks([as_chunk(i, range(4 * i, 4 * i + 4), part) for i, part in enumerate(parts)])
        assert merged.confidence is None
        assert merged.world_points.shape == (1, 8, *walk.local.shape[1:])
        for index, part in enumerate(parts):
            torch.testing.assert_close(merged.world_points[:, 4 * index : 4 * index + 4], part.world_points)
            torch.testing.assert_close(merged.camera_poses[:, 4 * index : 4 * index + 4], part.camera_poses)


def test_merging_views_of_different_sizes_is_refused():
    """Chunks whose views differ in size cannot be stacked: the error names the sizes (height, width)."""
    model = FakeModel(Walk(8))
    first, second = predict(model, range(0, 4)), predict(model, range(4, 8))
    smaller = G2VLMReconstructionOutput(**{k: v[:, :, :4] if v.dim() > 4 else v for k, v in second.items()})
    with pytest.raises(ValueError, match=r"different sizes \[\(4, 8\), \(6, 8\)\]; give all views one size"):
        merge_chunks([as_chunk(0, range(0, 4), first), as_chunk(1, range(4, 8), smaller)])


# ------------------------------------------------------------------------------------------------- loop closure


def test_loop_closure_leaves_a_single_chunk_alone():
    """With one chunk there is no chain to close: it comes back as it is, with no loop and no model pass."""
    model = StandInModel(LoopTrajectory(12))
    chunks = list(stream_reconstruction(model, loop_processor, range(12), 16, 4, describe_views=True))
    calls = len(model.calls)
    closed, loops = close_loops(model, loop_processor, range(12), chunks)
    assert len(chunks) == 1 and closed == chunks and closed[0] is chunks[0] and loops == []
    assert len(model.calls) == calls


def test_loop_closure_of_an_empty_sequence_says_it_is_empty():
    """No views, no chunks: loop closure has nothing to do and the merge says the sequence was empty (not an index
    error from looking for the first chunk's size)."""
    model = StandInModel(LoopTrajectory(12))
    assert close_loops(model, loop_processor, [], []) == ([], [])
    with pytest.raises(ValueError, match="No chunks to merge: the view sequence was empty"):
        reconstruct_chunked(model, loop_processor, [], 16, 4, loop_closure=True)
    assert model.calls == []


def test_a_loop_between_two_chunks_is_closed():
    """Two chunks are enough for a loop when the settings allow one (here a closed circle of 40 views in chunks of 24:
    views 0 and 39 are neighbours on it): it is verified with one more pass and kept, and the exact chain stays
    exact."""
    trajectory = LoopTrajectory(40)
    model = StandInModel(trajectory)
    chunks = list(stream_reconstruction(model, loop_processor, range(40), 24, 4, describe_views=True))
    config = LoopClosureConfig(min_separation=30, window=2, suppression=4)
    closed, loops = close_loops(model, loop_processor, range(40), chunks, config)
    assert len(chunks) == 2 and [loop.chunks for loop in loops] == [(0, 1)]
    assert len(model.calls) == 3
    assert relative_ate(merge_chunks(closed).camera_poses[0], trajectory) < 1e-5


def test_loop_closure_refuses_a_pair_chunk_of_another_view_size():
    """The pair chunk's points are fitted pixel by pixel onto the chain's: views of another size are refused with the
    remedy, not fitted on mismatched pixels."""
    trajectory = LoopTrajectory(200)
    model = StandInModel(trajectory)
    chunks = list(stream_reconstruction(model, loop_processor, range(200), 16, 4, describe_views=True))
    reconstruct = model.reconstruct

    def cropped(geometry_pixel_values, **kwargs):
        output = reconstruct(geometry_pixel_values, **kwargs)
        return G2VLMReconstructionOutput(**{k: v[:, :, :4] if v.dim() > 4 else v for k, v in output.items()})

    model.reconstruct = cropped
    with pytest.raises(ValueError, match=r"views of one size \(resize_views_to_first=True\)"):
        close_loops(model, loop_processor, range(200), chunks)
