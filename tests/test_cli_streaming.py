"""`g2vlm reconstruct --chunk-size` streams its outputs: a failure mid-stream leaves nothing at --output (and an
earlier output intact), host memory does not grow with the number of views, and --loop-closure runs end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_video
from PIL import Image
from test_cli_chunked import KnownGeometry, walk_poses, write_grey_views
from transformers import AutoProcessor

from g2vlm_hf.cli import main as g2vlm

trimesh = pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")
TESTS = Path(__file__).resolve().parent


class FailingGeometry(KnownGeometry):
    """The known geometry, until the fourth chunk: then it checks that the first chunks' depth maps were already
    written (into a hidden staging folder, not at the output) and fails with `error`. A chunk is handed out once the
    next one is queued on the device, so at the fourth call chunks 1 and 2 have been written."""

    def __init__(self, processor, poses, parent, error):
        super().__init__(processor, poses)
        self.parent, self.error, self.calls = parent, error, 0

    def reconstruct(self, geometry_pixel_values, **kwargs):
        self.calls += 1
        if self.calls == 4:
            staged = [path for path in self.parent.glob(".scene.g2vlm-staging.*/depth/*.png")]
            assert len(staged) == 2 * 10  # chunks 1 and 2 (6 + 4 new views), map and preview each
            raise self.error
        return super().reconstruct(geometry_pixel_values, **kwargs)


def chunked_args(model, folder, output, *extra):
    return ["reconstruct", "--model", str(model), "--folder", str(folder), "--chunk-size", "6", "--overlap", "2",
            "--output", str(output), "--device", "cpu", *extra]  # fmt: skip


@pytest.mark.parametrize(("error", "status"), [(ValueError("the model broke"), 2), (KeyboardInterrupt(), 130)])
def test_a_failure_mid_stream_leaves_no_output(small_views_model, tmp_path, monkeypatch, error, status):
    folder, scene = tmp_path / "views", tmp_path / "scene"
    write_grey_views(folder, range(16))
    processor = AutoProcessor.from_pretrained(small_views_model)
    model = FailingGeometry(processor, walk_poses(16), tmp_path, error)
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: model)
    assert g2vlm(chunked_args(small_views_model, folder, scene)) == status
    assert model.calls == 4
    assert not scene.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["views"]  # no staging, no lock left behind


def test_a_failure_mid_stream_keeps_the_earlier_output(small_views_model, tmp_path, monkeypatch):
    folder, scene = tmp_path / "views", tmp_path / "scene"
    write_grey_views(folder, range(16))
    processor = AutoProcessor.from_pretrained(small_views_model)
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: KnownGeometry(processor, walk_poses(16)))
    assert g2vlm(chunked_args(small_views_model, folder, scene)) == 0
    before = {path.relative_to(scene): path.read_bytes() for path in scene.rglob("*") if path.is_file()}

    model = FailingGeometry(processor, walk_poses(16), tmp_path, ValueError("the model broke"))
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: model)
    assert g2vlm(chunked_args(small_views_model, folder, scene, "--overwrite")) == 2
    after = {path.relative_to(scene): path.read_bytes() for path in scene.rglob("*") if path.is_file()}
    assert after == before


MEMORY_PROBE = """
import json, resource, sys
import g2vlm_hf.model_loading
from test_cli_chunked import KnownGeometry, walk_poses
from transformers import AutoProcessor
from g2vlm_hf.cli import main

processor = AutoProcessor.from_pretrained(sys.argv[1])
peaks = []
for count, argv in json.loads(sys.argv[2]):
    g2vlm_hf.model_loading.load_model = lambda *a, count=count, **k: KnownGeometry(processor, walk_poses(count))
    assert main(argv) == 0
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MB (ru_maxrss is in KB on Linux)
print(peaks[-1] - peaks[0])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in kilobytes on Linux")
def test_host_memory_does_not_grow_with_the_number_of_views(converted_tiny, tmp_path):
    """The peak resident memory of a process (torch's tensors, NumPy's arrays, Python's objects: tracemalloc would
    see only the last two) after a run over 16 views grows by little in a run over 128."""
    model_folder = tmp_path / "g2vlm-tiny"  # 224 x 112 geometry views: a chunk's arrays are a few MB
    shutil.copytree(converted_tiny, model_folder)
    config = json.loads((model_folder / "processor_config.json").read_text())
    config["image_processor"]["target_width"] = 224
    (model_folder / "processor_config.json").write_text(json.dumps(config))
    runs = []
    for count in (16, 128):
        folder = tmp_path / f"views{count}"
        write_grey_views(folder, range(count))
        runs.append((count, chunked_args(model_folder, folder, tmp_path / f"scene{count}", "--max-points", "2000")))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(model_folder), json.dumps(runs)],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    # measured: 0 MB (the per-view records and the GLB's camera frustums, tens of KB a view, fit under the first
    # peak); every chunk held until the end adds 193 MB, every chunk's checked arrays kept by the writer 42 MB
    assert growth_mb < 24, f"128 views grew the peak memory of a 16-view run by {growth_mb:.0f} MB"


def write_loop_video(path, frames: int) -> None:
    """A camera sliding right along the fixture's view and back again: the second half revisits the first."""
    from conftest import FIXTURE_DIR

    source = Image.open(FIXTURE_DIR / "images" / "view_0.png").convert("RGB")
    half = frames // 2
    offsets = [24 * index for index in range(half)] + [24 * (frames - 1 - index) for index in range(half, frames)]
    write_video(path, [source.crop((x, 0, x + 280, 280)).resize((112, 112)) for x in offsets])


def test_loop_closure_runs_end_to_end_with_the_tiny_checkpoint(small_views_model, tmp_path, monkeypatch):
    """`--loop-closure` hands every chunk of the stream (with the views' descriptors) to `close_loops`, and the
    outputs are the chunks it returns: here moved by a known shift after the real loop closure (the tiny random
    checkpoint keeps no loop, so the real one alone would change nothing visible)."""
    pytest.importorskip("scipy", reason="loop closure needs the loop extra (scipy)")
    import dataclasses

    import torch

    import g2vlm_hf.reconstruction
    from g2vlm_hf.chunked import transform_reconstruction
    from g2vlm_hf.similarity import Similarity

    real_close_loops, given = g2vlm_hf.reconstruction.close_loops, []
    shift = Similarity(1.0, torch.eye(3, dtype=torch.float64), torch.tensor([100.0, -50.0, 25.0], dtype=torch.float64))

    def shifted_close_loops(model, processor, views, chunks, *args, **kwargs):
        given.append(list(chunks))
        moved, loops = real_close_loops(model, processor, views, chunks, *args, **kwargs)
        return [dataclasses.replace(c, reconstruction=transform_reconstruction(c.reconstruction, shift)) for c in moved], loops  # fmt: skip

    monkeypatch.setattr(g2vlm_hf.reconstruction, "close_loops", shifted_close_loops)
    video, scene = tmp_path / "loop.mp4", tmp_path / "scene"
    write_loop_video(video, 20)
    args = ["reconstruct", "--model", str(small_views_model), "--video", str(video), "--every", "1", "--chunk-size",
            "4", "--overlap", "2", "--loop-closure", "--output", str(scene), "--device", "cpu"]  # fmt: skip
    assert g2vlm(args) == 0
    [chunks] = given  # called once, with the whole stream: 20 views in chunks of 4 sharing 2
    assert [index for chunk in chunks for index in chunk.view_indices] == list(range(20))
    assert all(chunk.descriptors is not None and len(chunk.descriptors) == len(chunk.view_indices) for chunk in chunks)
    cameras = json.loads((scene / "cameras.json").read_text())["cameras"]
    assert [camera["index"] for camera in cameras] == list(range(20))
    streamed = torch.cat([chunk.reconstruction.camera_poses[0] for chunk in chunks]).double()
    expected = streamed.clone()
    expected[:, :3, 3] += torch.tensor([100.0, -50.0, 25.0], dtype=torch.float64)
    written = torch.tensor([camera["camera_to_world"] for camera in cameras], dtype=torch.float64)
    torch.testing.assert_close(written, expected, atol=1e-4, rtol=1e-5)
    assert len(list((scene / "depth").glob("view_*_preview.png"))) == 20
    assert len(trimesh.load(scene / "points.ply").vertices) > 0
    assert trimesh.load(scene / "scene.glb").geometry


def test_loop_closure_without_chunks_is_refused_before_model_work(small_views_model, tmp_path, monkeypatch):
    folder = tmp_path / "views"
    write_grey_views(folder, range(3))
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", no_model)
    monkeypatch.setattr("g2vlm_hf.model_loading.load_processor", no_model)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from g2vlm_hf.cli import main; sys.exit(main())", "reconstruct",
         "--model", str(small_views_model), "--folder", str(folder), "--loop-closure", "--output",
         str(tmp_path / "scene")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("g2vlm")]
    assert lines == [
        "g2vlm: error: --loop-closure works on a chunked reconstruction: give --chunk-size too (e.g. 32), or leave "
        "--loop-closure out."
    ]
    assert g2vlm(["reconstruct", "--model", str(small_views_model), "--folder", str(folder), "--loop-closure",
                  "--output", str(tmp_path / "scene")]) == 2  # fmt: skip
    assert not (tmp_path / "scene").exists()


def test_loop_closure_reads_any_view_again_from_a_lazy_source(tmp_path):
    from g2vlm_hf.inputs import folder_views
    from g2vlm_hf.reconstruction import RereadViews

    folder = tmp_path / "views"
    write_grey_views(folder, range(9))
    source = folder_views(folder)
    views = RereadViews(source, window=3)
    assert len(views) == 9
    for index in (7, 8, 0, 4, 5, 2):  # places asked for out of order
        assert views[index].getpixel((0, 0)) == (20 + 10 * index,) * 3


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_confidence_percentile_is_refused_with_chunks(small_views_model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "views"
    write_grey_views(folder, range(3))
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", no_model)
    args = chunked_args(small_views_model, folder, tmp_path / "scene", "--confidence-percentile", "20")
    assert g2vlm(args) == 2
    assert "--confidence-percentile" in capsys.readouterr().err
    assert not (tmp_path / "scene").exists()


def test_loop_closure_without_scipy_says_which_extra(small_views_model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "views"
    write_grey_views(folder, range(3))

    monkeypatch.setitem(sys.modules, "scipy", None)  # what `import scipy` meets where scipy is not installed
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", no_model)
    monkeypatch.setattr("g2vlm_hf.model_loading.load_processor", no_model)
    assert g2vlm(chunked_args(small_views_model, folder, tmp_path / "scene", "--loop-closure")) == 2
    assert 'pip install "g2vlm-hf[loop]"' in capsys.readouterr().err
    assert not (tmp_path / "scene").exists()
