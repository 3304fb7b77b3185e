"""The `g2vlm` command line: reconstruction to files that reload with trimesh, and streamed chat."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR, greedy_answer, write_video
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from g2vlm_hf.cli import main as g2vlm

trimesh = pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")

IMAGES = FIXTURE_DIR / "images"
VIEWS = [IMAGES / f"view_{index}.png" for index in range(3)]


def reference_reconstruction(converted_tiny, views):
    model = AutoModelForImageTextToText.from_pretrained(converted_tiny).eval()
    processor = AutoProcessor.from_pretrained(converted_tiny)
    with torch.no_grad():
        return model.reconstruct(**processor(geometry_images=views, return_tensors="pt"))


def test_reconstruct_writes_files_that_reload_with_the_model_points(converted_tiny, tmp_path):
    output = tmp_path / "scene"
    assert g2vlm(["reconstruct", "--model", str(converted_tiny), *map(str, VIEWS), "--output", str(output)]) == 0
    expected = reference_reconstruction(converted_tiny, VIEWS)

    cloud = trimesh.load(output / "points.ply")
    points = expected.world_points[0].reshape(-1, 3).numpy()
    assert len(cloud.vertices) == len(points)
    np.testing.assert_allclose(np.asarray(cloud.vertices), points, rtol=1e-5, atol=1e-5)

    scene = trimesh.load(output / "scene.glb")
    cameras = [name for name in scene.graph.nodes_geometry if name.startswith("camera_")]
    assert len(cameras) == len(VIEWS)

    saved = json.loads((output / "cameras.json").read_text())["cameras"]
    np.testing.assert_allclose(
        np.array([c["camera_to_world"] for c in saved]), expected.camera_poses[0].numpy(), atol=1e-6
    )
    assert sorted(p.name for p in (output / "depth").iterdir() if "preview" not in p.name) == [
        f"view_00{i}.png" for i in range(3)
    ]
    assert Image.open(output / "depth" / "view_000.png").mode == "I;16"


def test_reconstruct_from_a_folder_equals_from_files(converted_tiny, tmp_path):
    folder = tmp_path / "views"
    folder.mkdir()
    for view in VIEWS:
        shutil.copy(view, folder / view.name)
    (folder / "notes.txt").write_text("not an image, ignored")
    assert (
        g2vlm(["reconstruct", "--model", str(converted_tiny), "--folder", str(folder), "--output", str(tmp_path / "a")])
        == 0
    )
    assert (
        g2vlm(["reconstruct", "--model", str(converted_tiny), *map(str, VIEWS), "--output", str(tmp_path / "b")]) == 0
    )
    assert (tmp_path / "a" / "cameras.json").read_text() == (tmp_path / "b" / "cameras.json").read_text()


def test_every_and_max_views_subsample_a_folder_and_image_files(converted_tiny, tmp_path, capsys):
    """`--every` / `--max-views` pick views of a folder or of image files as of a video (the one-pass limit's error
    suggests them for any source; they were ignored but for a video): files 0, 3, 6 of seven, then the first two."""
    folder = tmp_path / "views"
    folder.mkdir()
    for index in range(7):  # seven distinct views: the three fixture views flipped and turned
        image = Image.open(VIEWS[index % 3]).convert("RGB")
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if index >= 3 else image
        image.rotate(90 * (index // 6), expand=False).save(folder / f"frame_{index:02d}.png")
    files = sorted(folder.iterdir())
    for source, flags, picked in (
        (["--folder", str(folder)], ["--every", "3"], [0, 3, 6]),
        ([str(path) for path in files], ["--every", "3", "--max-views", "2"], [0, 3]),
        (["--folder", str(folder)], ["--max-views", "2"], [0, 1]),
    ):
        output = tmp_path / f"out-{len(picked)}-{picked[1]}"
        assert g2vlm(["reconstruct", "--model", str(converted_tiny), *source, *flags, "--output", str(output)]) == 0
        assert f"Reconstructed {len(picked)} views" in capsys.readouterr().out
        saved = json.loads((output / "cameras.json").read_text())["cameras"]
        expected = reference_reconstruction(converted_tiny, [Image.open(files[index]) for index in picked])
        poses = np.array([camera["camera_to_world"] for camera in saved])
        np.testing.assert_allclose(poses, expected.camera_poses[0].numpy(), atol=1e-5)
        assert [camera["name"] for camera in saved] == [files[index].name for index in picked]
    assert g2vlm(["reconstruct", "--model", str(converted_tiny), "--folder", str(folder), "--every", "7",
                  "--output", str(tmp_path / "one")]) == 2  # fmt: skip
    assert "--every 7 keeps 1 of the 7 image files" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()


def test_a_reconstruction_only_checkpoint_reconstructs_and_refuses_questions(converted_tiny, tmp_path, capsys):
    """`g2vlm-convert --reconstruction-only`'s output: `reconstruct` writes what the full model writes; `--ask` and
    `chat` say in one line that they need the full model (it was transformers' 'Unrecognized configuration class'
    with a hundred class names)."""
    from g2vlm_hf.conversion import build_reconstruction_only

    recon = build_reconstruction_only(converted_tiny, tmp_path / "recon")
    for model, output in ((converted_tiny, "out-full"), (recon, "out-recon")):
        assert g2vlm(["reconstruct", "--model", str(model), *map(str, VIEWS), "--output", str(tmp_path / output)]) == 0
        assert "Reconstructing the 3 views in one pass..." in capsys.readouterr().err  # no bar within one pass
    assert (tmp_path / "out-recon" / "cameras.json").read_text() == (tmp_path / "out-full" / "cameras.json").read_text()
    capsys.readouterr()
    asked = ["reconstruct", "--model", str(recon), *map(str, VIEWS), "--output", str(tmp_path / "a"), "--ask", "Q?"]
    for argv in (asked, ["chat", "--model", str(recon), "--image", str(VIEWS[0]), "Where?"]):
        assert g2vlm(argv) == 2
        stderr = capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert "Traceback" not in stderr and len(errors) == 1, stderr
        assert "is a reconstruction-only checkpoint (no language-model head)" in errors[0], stderr
    assert not (tmp_path / "a").exists()


def test_reconstruct_from_video_frames(converted_tiny, tmp_path):
    """`--every 2` reconstructs the decoded frames 0, 2 and 4 (views 0, 2, 1), not merely three frames."""
    av = pytest.importorskip("av", reason="the video extra (PyAV) is part of the test extras")
    frames = [Image.open(VIEWS[index % 3]).convert("RGB").resize((518, 140)) for index in range(6)]
    video = write_video(tmp_path / "walk.mp4", frames, rate=5)
    output = tmp_path / "scene"
    args = [
        "reconstruct",
        "--model",
        str(converted_tiny),
        "--video",
        str(video),
        "--every",
        "2",
        "--output",
        str(output),
    ]
    assert g2vlm(args) == 0
    saved = json.loads((output / "cameras.json").read_text())["cameras"]
    assert len(saved) == 3
    with av.open(str(video)) as container:  # decoded here with PyAV alone, not through the package's reader
        decoded = [frame.to_image() for frame in container.decode(container.streams.video[0])]
    expected = reference_reconstruction(converted_tiny, decoded[0::2])  # frames 0, 2 and 4
    poses = np.array([camera["camera_to_world"] for camera in saved])
    np.testing.assert_allclose(poses, expected.camera_poses[0].numpy(), atol=1e-5)


def test_max_points_subsamples_the_cloud(converted_tiny, tmp_path):
    output = tmp_path / "scene"
    args = ["reconstruct", "--model", str(converted_tiny), *map(str, VIEWS[:2]), "--output", str(output)]
    assert g2vlm([*args, "--max-points", "1000"]) == 0
    sampled = trimesh.load(output / "points.ply")
    assert len(sampled.vertices) == 1000
    full_output = tmp_path / "full"
    assert (
        g2vlm(["reconstruct", "--model", str(converted_tiny), *map(str, VIEWS[:2]), "--output", str(full_output)]) == 0
    )
    full = trimesh.load(full_output / "points.ply")
    assert len(full.vertices) > 1000
    # the kept points are points of the full cloud, each with its own colour (a subsample, not new or moved points)
    everything = {(*point, *colour) for point, colour in zip(full.vertices.tolist(), full.colors.tolist(), strict=True)}
    kept = {(*point, *colour) for point, colour in zip(sampled.vertices.tolist(), sampled.colors.tolist(), strict=True)}
    assert len(kept) == 1000 and kept <= everything


def test_resize_views_reaches_the_processor_for_this_run(converted_tiny, tmp_path, capsys):
    """`--resize-views` reconstructs views of different sizes as the processor does with `resize_views_to_first=True`
    for that call; without it they are refused."""
    smaller = tmp_path / "smaller.png"
    Image.open(VIEWS[1]).convert("RGB").resize((300, 90)).save(smaller)
    views = [str(VIEWS[0]), str(smaller)]
    assert g2vlm(["reconstruct", "--model", str(converted_tiny), *views, "--output", str(tmp_path / "refused")]) == 2
    assert "--resize-views" in capsys.readouterr().err
    output = tmp_path / "scene"
    argv = ["reconstruct", "--model", str(converted_tiny), *views, "--output", str(output), "--resize-views"]
    assert g2vlm(argv) == 0
    model = AutoModelForImageTextToText.from_pretrained(converted_tiny).eval()
    processor = AutoProcessor.from_pretrained(converted_tiny)
    with torch.no_grad():
        expected = model.reconstruct(
            **processor(geometry_images=views, return_tensors="pt", resize_views_to_first=True)
        )
    saved = json.loads((output / "cameras.json").read_text())["cameras"]
    np.testing.assert_allclose(
        np.array([c["camera_to_world"] for c in saved]), expected.camera_poses[0].numpy(), atol=1e-6
    )


def test_chat_streams_the_greedy_answer(converted_tiny, capsys):
    question = "How far is the red box from the blue wall?"
    assert (
        g2vlm(
            [
                "chat",
                "--model",
                str(converted_tiny),
                "--image",
                str(IMAGES / "chat.png"),
                question,
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    streamed = capsys.readouterr().out

    model = AutoModelForImageTextToText.from_pretrained(converted_tiny).eval()
    processor = AutoProcessor.from_pretrained(converted_tiny)
    expected = greedy_answer(model, processor, [str(IMAGES / "chat.png")], question, 6)
    assert streamed.strip() == expected


class TestBadInput:
    def test_no_views(self, converted_tiny, tmp_path, capsys):
        assert g2vlm(["reconstruct", "--model", str(converted_tiny), "--output", str(tmp_path / "o")]) == 2
        assert "exactly one of them" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()

    @pytest.mark.parametrize("chunking", [[], ["--chunk-size", "2", "--overlap", "1"]], ids=["one-pass", "chunked"])
    def test_corrupt_image_leaves_nothing_behind(self, converted_tiny, tmp_path, capsys, chunking):
        """Found before the outputs are staged (one pass reads every view first) or while streaming into them
        (chunked): either way nothing is left beside the input."""
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG but not really")
        args = [
            "reconstruct",
            "--model",
            str(converted_tiny),
            str(VIEWS[0]),
            str(broken),
            "--output",
            str(tmp_path / "o"),
            *chunking,
        ]
        assert g2vlm(args) == 2
        assert "not an image" in capsys.readouterr().err
        assert [path.name for path in tmp_path.iterdir()] == ["broken.png"]  # no output, staging folder or lock

    def test_empty_folder(self, converted_tiny, tmp_path, capsys):
        (tmp_path / "empty").mkdir()
        args = [
            "reconstruct",
            "--model",
            str(converted_tiny),
            "--folder",
            str(tmp_path / "empty"),
            "--output",
            str(tmp_path / "o"),
        ]
        assert g2vlm(args) == 2
        assert "holds no image files" in capsys.readouterr().err
