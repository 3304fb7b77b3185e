"""Behaviour of the streaming export (`export/streaming.py`) that a mutation-testing pass found unpinned by the other
tests: the options that change what is written (`point_colouring="view"`, `frustum_scale`,
`write_colmap_images=False`) give the one-pass export's files; the reservoir's memory is the documented 31 bytes a
held float32 point, with a chunk offered to a full reservoir costing about 16 bytes per held point rather than a copy
of the reservoir; what `add_views` and `close` return, the writer after a failure, and the errors of a scene without
views, points or cameras."""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import pytest
from test_streaming_export import assert_same_files, one_pass, stream, synthetic_scene
from transformers.utils import logging

from g2vlm_hf.export import check_scene, export_colmap
from g2vlm_hf.export.colmap import NoUsableCameraError
from g2vlm_hf.export.streaming import PointReservoir, StreamingSceneWriter

pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")


def test_view_colouring_and_frustum_scale_give_the_one_pass_files(tmp_path):
    """`point_colouring="view"` colours each point by the view it comes from and `frustum_scale` sizes the cameras'
    frustums in `scene.glb`, as `write_scene` does; a confidence without `min_confidence` filters nothing (NaN
    confidence included): catches a view index computed wrongly from the stream position, a colour table of the
    wrong length, either option dropped on the way to the GLB/PLY encoders, or a confidence filter without a
    threshold."""
    arrays = synthetic_scene(7, seed=11)
    confidence = np.random.default_rng(11).uniform(0, 2, arrays["depth"].shape).astype(np.float32)
    confidence[3, :2] = np.nan
    arrays["confidence"] = confidence
    options = dict(point_colouring="view", frustum_scale=0.4)
    streamed = stream(arrays, tmp_path / "streamed", [3, 1], max_points=None, **options)
    expected = one_pass(arrays, tmp_path / "one", options, {})
    assert_same_files(streamed, expected, tmp_path / "streamed", tmp_path / "one")


def test_colmap_without_images_is_the_one_pass_model_without_images(tmp_path):
    """`write_colmap_images=False` writes the COLMAP text model alone (the images are kept elsewhere, so their names
    need not end in .png): catches images written anyway or the text files changed by the option."""
    arrays = synthetic_scene(5, seed=12)
    names = [f"frame{index}.jpg" for index in range(5)]
    folder = tmp_path / "streamed"
    with StreamingSceneWriter(
        folder / "scene", colmap_dir=folder / "sparse", max_points=None, write_colmap_images=False
    ) as writer:
        for start in range(0, 5, 2):
            part = check_scene(**{name: value[start : start + 2] for name, value in arrays.items()})
            writer.add_views(part, image_names=names[start : start + 2])
    streamed = writer.written
    expected = one_pass(arrays, tmp_path / "one", {}, dict(write_images=False, image_names=names))
    assert_same_files(streamed, expected, tmp_path / "streamed", tmp_path / "one")
    assert not (tmp_path / "streamed" / "sparse" / "images").exists()
    images = (tmp_path / "streamed" / "sparse" / "images.txt").read_text()
    assert [line.split()[-1] for line in images.splitlines()[4::2]] == [n for k, n in enumerate(names) if k != 2]


def traced(function) -> tuple[int, int]:
    """(memory still held, peak) allocated by `function()`, in bytes, as traced by tracemalloc."""
    tracemalloc.start()
    try:
        function()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current, peak


def test_the_reservoir_holds_31_bytes_a_float32_point_and_a_chunk_does_not_copy_it():
    """Memory of the point budget, as documented: a held float32 point costs 31 bytes (stream position 8, point 12,
    colour 3, key 8), and offering a chunk to a full reservoir costs the chunk's own arrays plus about 16 bytes per
    held point (its keys joined with the chunk's, and their ranking), not a copy of the held points: catches float32
    points widened to float64 (43 bytes a point) and a full reservoir concatenated with each chunk."""
    held, chunk = 400_000, 4_000
    rng = np.random.default_rng(2)
    positions = np.arange(held + chunk, dtype=np.int64)
    points = rng.normal(size=(held + chunk, 3)).astype(np.float32)
    colours = rng.integers(0, 256, (held + chunk, 3), dtype=np.uint8)
    box = {}

    def fill():
        box["reservoir"] = PointReservoir(held, seed=0)
        box["reservoir"].add(positions[:held], points[:held], colours[:held])

    current, _ = traced(fill)
    assert 31 * held <= current < 31 * held + 64 * 1024, current / held
    reservoir = box["reservoir"]
    assert len(reservoir.order) == held
    _, peak = traced(lambda: reservoir.add(positions[held:], points[held:], colours[held:]))
    assert peak < 18 * held + 100 * chunk, peak / held  # a copy of the reservoir alone is 31 bytes a held point
    assert len(reservoir.order) == held and reservoir.seen == held + chunk


def part(arrays: dict, start: int, stop: int):
    return check_scene(**{name: value[start:stop] for name, value in arrays.items()})


def test_add_views_returns_the_files_written_for_those_views(tmp_path):
    """`add_views` returns the files it wrote for the views added (their depth maps, previews and COLMAP images, on
    disk already), as documented: catches a call that returns nothing or another call's files."""
    arrays = synthetic_scene(5, seed=13)
    with StreamingSceneWriter(tmp_path / "scene", colmap_dir=tmp_path / "sparse") as writer:
        first = writer.add_views(part(arrays, 0, 2))
        second = writer.add_views(part(arrays, 2, 5))
        assert all(path.is_file() for path in first + second)
    depth = tmp_path / "scene" / "depth"
    assert first == [depth / "view_000.png", depth / "view_000_preview.png", depth / "view_001.png",
                     depth / "view_001_preview.png", tmp_path / "sparse" / "images" / "view_000.png",
                     tmp_path / "sparse" / "images" / "view_001.png"]  # fmt: skip
    assert second == [
        *(depth / f"view_{index:03d}{suffix}.png" for index in (2, 3, 4) for suffix in ("", "_preview")),
        *(tmp_path / "sparse" / "images" / f"view_{index:03d}.png" for index in (3, 4)),  # view 2 has no camera
    ]


def test_after_a_failure_the_writer_is_closed_and_lists_no_file(tmp_path):
    """Once a failure has removed the export, the writer lists no file and takes no more views (they would be
    written into an export that no longer exists, and `close` would then write a scene of the later views alone):
    catches a discard that leaves the writer open with its list of removed files."""
    arrays = synthetic_scene(4, seed=14)
    writer = StreamingSceneWriter(tmp_path / "scene")
    with pytest.raises(RuntimeError, match="interrupted"), writer:
        writer.add_views(part(arrays, 0, 2))
        raise RuntimeError("interrupted")
    assert writer.written == [] and not (tmp_path / "scene").exists()
    with pytest.raises(ValueError, match="closed"):
        writer.add_views(part(arrays, 2, 4))
    assert writer.close() == [] and not (tmp_path / "scene").exists()


def test_cleanup_survives_a_file_already_gone_and_names_a_folder_it_keeps(tmp_path, caplog):
    """A failure's cleanup removes the rest even when one of the files is already gone (the caller sees the error
    that stopped the export, not a FileNotFoundError from the cleanup), and the folder it created but cannot remove
    (someone else's file is in it) is named in a warning: catches an unlink that needs the file and a silent keep."""
    arrays = synthetic_scene(3, seed=15)
    logging.enable_propagation()
    try:
        writer = StreamingSceneWriter(tmp_path / "out" / "scene")
        with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="interrupted"), writer:
            writer.add_views(part(arrays, 0, 3))
            (tmp_path / "out" / "scene" / "depth" / "view_001.png").unlink()  # removed by someone else
            (tmp_path / "out" / "notes.txt").write_text("not the writer's")
            raise RuntimeError("interrupted")
    finally:
        logging.disable_propagation()
    assert sorted(path.name for path in (tmp_path / "out").rglob("*")) == ["notes.txt"]
    assert f"Left {tmp_path / 'out'} in place" in caplog.text


def test_swapped_original_sizes_are_judged_by_the_first_chunk_alone(tmp_path, caplog):
    """As in the one-pass export, `original_sizes` given as (width, height) are said in a warning, judged by the
    first view (a later view may have been squashed to the first one's shape on purpose, so a later chunk of another
    aspect is not warned about): catches the check moved to the later chunks (a swap of the first views goes
    unsaid and the original intrinsics in `cameras.json` are silently wrong)."""
    arrays = synthetic_scene(4, seed=16)  # 24 x 32 views (landscape)
    warning = "`original_sizes` are (height, width)"
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"), StreamingSceneWriter(tmp_path / "swapped") as writer:
            writer.add_views(part(arrays, 0, 2), [(640, 480)] * 2)  # (width, height) of 480 x 640 views
            assert warning in caplog.text
        caplog.clear()
        with caplog.at_level("WARNING"), StreamingSceneWriter(tmp_path / "squashed") as writer:
            writer.add_views(part(arrays, 0, 2), [(480, 640)] * 2)
            writer.add_views(part(arrays, 2, 4), [(640, 480)] * 2)  # portrait views squashed to the first's shape
        assert warning not in caplog.text
    finally:
        logging.disable_propagation()


def test_a_missing_trimesh_is_said_before_anything_is_written(tmp_path, monkeypatch):
    """Without trimesh (the `export` extra) the writer refuses at once, saying how to install it, not after every
    view has been reconstructed and written (the GLB and PLY need it at `close`): catches the early check dropped."""
    monkeypatch.setitem(sys.modules, "trimesh", None)  # `import trimesh` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "g2vlm-hf\[export\]"'):
        StreamingSceneWriter(tmp_path / "scene")
    assert not (tmp_path / "scene").exists()


def test_a_scene_without_any_camera_drops_its_colmap_model_alone(tmp_path):
    """When no view has a usable camera, `drop_colmap_without_cameras` says why (NoUsableCameraError) and the scene
    is still written, without any COLMAP file; with one usable camera it drops nothing; without the call, `close`
    raises that error and leaves nothing: catches the model dropped while a camera is usable, or not dropped."""
    arrays = synthetic_scene(3, seed=17)
    no_camera = {**arrays, "intrinsics": np.full_like(arrays["intrinsics"], np.nan)}
    with StreamingSceneWriter(tmp_path / "a" / "scene", colmap_dir=tmp_path / "a" / "sparse") as writer:
        writer.add_views(part(no_camera, 0, 3))
        assert isinstance(writer.drop_colmap_without_cameras(), NoUsableCameraError)
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == ["scene"]
    assert (tmp_path / "a" / "scene" / "points.ply").is_file()

    with StreamingSceneWriter(tmp_path / "b" / "scene", colmap_dir=tmp_path / "b" / "sparse") as writer:
        writer.add_views(part(arrays, 0, 3))  # view 2 alone has no camera
        assert writer.drop_colmap_without_cameras() is None
    assert (tmp_path / "b" / "sparse" / "points3D.txt").is_file()

    with pytest.raises(NoUsableCameraError), StreamingSceneWriter(tmp_path / "c", colmap_dir=tmp_path / "d") as writer:
        writer.add_views(part(no_camera, 0, 3))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_close_returns_every_file_once_and_a_second_close_writes_nothing(tmp_path):
    """`close` returns every file of the export (the views' files and the final ones), each once; closing again
    (after the `with` block, say) returns the same list and rewrites nothing: catches a close that returns nothing
    or writes the final files a second time."""
    arrays = synthetic_scene(4, seed=18)
    writer = StreamingSceneWriter(tmp_path / "scene", colmap_dir=tmp_path / "sparse")
    added = writer.add_views(part(arrays, 0, 2)) + writer.add_views(part(arrays, 2, 4))
    written = writer.close()
    finals = {tmp_path / "scene" / name for name in ("scene.glb", "points.ply", "cameras.json")}
    finals |= {tmp_path / "sparse" / name for name in ("cameras.txt", "images.txt", "points3D.txt")}
    assert len(written) == len(set(written)) and set(written) == set(added) | finals
    stamps = {path: path.stat().st_mtime_ns for path in written}
    assert writer.close() == written
    assert {path: path.stat().st_mtime_ns for path in written} == stamps


def test_closing_without_views_or_without_a_point_for_colmap_says_why(tmp_path):
    """A writer closed before any view was added says so (not that all of zero points were filtered away); a COLMAP
    model whose points all lie on views without a usable camera is refused, as by the one-pass `export_colmap`,
    rather than written empty; either way nothing is left: catches a misleading message and an empty model."""
    with pytest.raises(ValueError, match="No views were added"):
        StreamingSceneWriter(tmp_path / "empty").close()
    assert not (tmp_path / "empty").exists()

    arrays = synthetic_scene(3, seed=19)
    arrays["world_points"][[0, 1]] = np.nan  # the finite points are on view 2, which has no usable camera
    with pytest.raises(ValueError, match="filtered away"):
        export_colmap(tmp_path / "one", **{name: value for name, value in arrays.items() if name != "depth"})
    writer = StreamingSceneWriter(tmp_path / "scene", colmap_dir=tmp_path / "sparse")
    with pytest.raises(ValueError, match="filtered away"), writer:
        writer.add_views(part(arrays, 0, 3))
    assert not (tmp_path / "scene").exists() and not (tmp_path / "sparse").exists()
