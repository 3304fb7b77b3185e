"""`g2vlm reconstruct --chunk-size/--overlap` on a generated video, the one-pass limit pointing to it, and questions
about a long video asked on a few uniformly spread frames."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DIR, greedy_answer, write_video
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.modeling.outputs import G2VLMReconstructionOutput

pytest.importorskip("av", reason="the video extra (PyAV) is part of the test extras")
trimesh = pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")


def write_walk_video(path, frames: int, size=(518, 140)) -> None:
    """A camera sliding along the fixture's first view: `frames` crops 8 pixels apart."""
    source = Image.open(FIXTURE_DIR / "images" / "view_0.png").convert("RGB")
    write_video(path, [source.crop((x := 8 * index % 500, 0, x + 518, 280)).resize(size) for index in range(frames)])


def test_reconstruct_a_video_in_chunks(small_views_model, tmp_path):
    """Every kept frame gets a camera, a depth map and its points; the first chunk's views keep the frame and poses the
    model gives them (the merge is into the first chunk's frame, `test_chunked_outputs_match_the_known_geometry`
    checks the alignment of the later chunks); the question is asked on uniformly spread frames."""
    import av

    video, output, sparse = tmp_path / "walk.mp4", tmp_path / "scene", tmp_path / "sparse"
    write_walk_video(video, 24)
    args = ["reconstruct", "--model", str(small_views_model), "--video", str(video), "--every", "2", "--chunk-size", "5",
            "--overlap", "2", "--output", str(output), "--colmap", str(sparse), "--ask", "Where is the box?",
            "--ask-views", "4", "--ask-views-by", "uniform", "--max-new-tokens", "2"]  # fmt: skip
    assert g2vlm(args) == 0

    cameras = json.loads((output / "cameras.json").read_text())["cameras"]
    assert len(cameras) == 12  # frames 0, 2, ..., 22
    assert [camera["name"] for camera in cameras] == [f"walk.mp4#frame{frame}" for frame in range(0, 24, 2)]
    poses = np.array([camera["camera_to_world"] for camera in cameras])
    assert np.isfinite(poses).all()
    np.testing.assert_allclose(poses[:, :3, :3] @ poses[:, :3, :3].transpose(0, 2, 1), np.eye(3)[None].repeat(12, 0), atol=1e-4)  # fmt: skip
    # the first chunk (kept frames 0..4 = video frames 0, 2, ..., 8, decoded by PyAV) is the model's own reconstruction
    with av.open(str(video)) as container:
        decoded = [frame.to_image() for frame in container.decode(container.streams.video[0])]
    model = AutoModelForImageTextToText.from_pretrained(small_views_model).eval()
    processor = AutoProcessor.from_pretrained(small_views_model)
    with torch.no_grad():
        first = model.reconstruct(**processor(geometry_images=decoded[0:10:2], return_tensors="pt"))
    np.testing.assert_allclose(poses[:5], first.camera_poses[0].numpy(), atol=1e-5)

    assert len([path for path in (output / "depth").iterdir() if "preview" not in path.name]) == 12
    width, height = cameras[0]["width"], cameras[0]["height"]
    assert (width, height) == tuple(first.depth.shape[-1:-3:-1])
    assert len(trimesh.load(output / "points.ply").vertices) == 12 * height * width
    usable = sum(  # random weights leave some views without a pinhole camera (intrinsics written as null)
        all(value is not None for row in camera["intrinsics"] for value in row)
        and camera["intrinsics"][0][0] > 0
        and camera["intrinsics"][1][1] > 0
        for camera in cameras
    )
    images = (sparse / "images.txt").read_text().splitlines()
    assert sum(1 for line in images if line.endswith(".png")) == usable

    # 4 of the 12 kept frames, first and last included, evenly spread: kept indices 0, 11/3, 22/3, 11 rounded to
    # 0, 4, 7, 11, i.e. video frames 0, 8, 14, 22
    document = json.loads((output / "answer.json").read_text())
    assert document["views"] == ["walk.mp4#frame0", "walk.mp4#frame8", "walk.mp4#frame14", "walk.mp4#frame22"]


def test_max_points_defaults_to_a_cap_for_many_views(small_views_model, tmp_path, monkeypatch):
    import g2vlm_hf.cli.reconstruct

    monkeypatch.setattr(g2vlm_hf.cli.reconstruct, "DEFAULT_MAX_POINTS", 1000)
    video, output = tmp_path / "walk.mp4", tmp_path / "scene"
    write_walk_video(video, 6)
    args = ["reconstruct", "--model", str(small_views_model), "--video", str(video), "--chunk-size", "4", "--overlap", "2",
            "--every", "1", "--output", str(output)]  # fmt: skip
    assert g2vlm(args) == 0
    assert len(trimesh.load(output / "points.ply").vertices) == 1000  # of 6 x 56 x 14


def test_too_many_views_for_one_pass_points_to_chunking(small_views_model, tmp_path, capsys):
    video = tmp_path / "long.mp4"
    write_walk_video(video, 257, size=(64, 48))
    args = [
        "reconstruct",
        "--model",
        str(small_views_model),
        "--video",
        str(video),
        "--every",
        "1",
        "--output",
        str(tmp_path / "out"),
    ]
    assert g2vlm(args) == 2
    error = capsys.readouterr().err
    assert "257 views" in error and "--chunk-size" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("chunk_size", "overlap", "message"),
    [
        ("1", "1", "--chunk-size must be at least 2"),
        ("8", "8", "--overlap must be at least 1 and less than --chunk-size 8"),
        ("8", "0", "--overlap must be at least 1 and less than --chunk-size 8"),
    ],
)
def test_bad_chunk_flags_are_refused(small_views_model, tmp_path, capsys, chunk_size, overlap, message):
    video = tmp_path / "walk.mp4"
    write_walk_video(video, 2)
    args = ["reconstruct", "--model", str(small_views_model), "--video", str(video), "--chunk-size", chunk_size,
            "--overlap", overlap, "--output", str(tmp_path / "out")]  # fmt: skip
    assert g2vlm(args) == 2
    error = capsys.readouterr().err
    assert message in error
    assert not (tmp_path / "out").exists()


def test_chat_over_a_video_uses_a_few_uniform_frames(small_views_model, tmp_path, capsys, monkeypatch):
    """The question is asked on the decoded frames 0, 10, 19 and 29 (checked against PyAV's own decoding, not the
    package's reader), which the command names on stderr."""
    import av

    from g2vlm_hf import chat

    video = tmp_path / "walk.mp4"
    write_walk_video(video, 30)
    real_answer, asked = chat.answer, []

    def recording_answer(model, processor, images, *args, **kwargs):
        asked.append([np.asarray(image.convert("RGB")) for image in images])
        return real_answer(model, processor, images, *args, **kwargs)

    monkeypatch.setattr(chat, "answer", recording_answer)
    args = ["chat", "--model", str(small_views_model), "--video", str(video), "--views", "4", "Where is the box?",
            "--max-new-tokens", "3"]  # fmt: skip
    assert g2vlm(args) == 0
    captured = capsys.readouterr()
    assert "frame0, walk.mp4#frame10, walk.mp4#frame19, walk.mp4#frame29" in captured.err
    with av.open(str(video)) as container:
        decoded = [frame.to_image() for frame in container.decode(container.streams.video[0])]
    frames = [decoded[index] for index in (0, 10, 19, 29)]
    [images] = asked
    assert len(images) == 4 and all(
        np.array_equal(got, np.asarray(want)) for got, want in zip(images, frames, strict=True)
    )

    model = AutoModelForImageTextToText.from_pretrained(small_views_model).eval()
    processor = AutoProcessor.from_pretrained(small_views_model)
    expected = greedy_answer(model, processor, frames, "Where is the box?", 3)
    assert expected and captured.out.strip() == expected


# ---------------------------------------------------------------------- the merge against independently known geometry

GREY_BASE, GREY_STEP = 20, 10


class KnownGeometry:
    """A stand-in model that knows the scene: it recognises each view it is shown by its grey level, returns that
    view's true camera and points, and expresses every call (every chunk) in a fresh random similarity frame, as a
    real model's chunks come in frames and scales of their own."""

    def __init__(self, processor, poses: torch.Tensor):
        self.processor, self.poses = processor, poses
        self.generator = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")

    def reconstruct(self, geometry_pixel_values, **_):
        images = self.processor.geometry_image_processor.unnormalize(geometry_pixel_values[0]).double()
        views = ((images.mean(dim=(1, 2, 3)) - GREY_BASE) / GREY_STEP).round().long()
        height, width = geometry_pixel_values.shape[-2:]
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        depth = 2 + 0.3 * torch.sin(columns / 7.0) * torch.cos(rows / 5.0)
        local = torch.stack([(columns - width / 2) / width * depth, (rows - height / 2) / width * depth, depth], -1)
        poses = self.poses[views]
        world = torch.einsum("nij,hwj->nhwi", poses[:, :3, :3], local.double()) + poses[:, None, None, :3, 3]
        scale = float(torch.exp(torch.randn(1, generator=self.generator, dtype=torch.float64) * 0.5))
        rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=self.generator, dtype=torch.float64))
        rotation = rotation * torch.sign(torch.linalg.det(rotation))
        shift = torch.randn(3, generator=self.generator, dtype=torch.float64)
        moved = poses.clone()
        moved[:, :3, :3] = rotation @ poses[:, :3, :3]
        moved[:, :3, 3] = scale * poses[:, :3, 3] @ rotation.T + shift
        intrinsics = torch.tensor([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1.0]]).expand(len(views), 3, 3)
        return G2VLMReconstructionOutput(
            camera_poses=moved[None].float(),
            local_points=(scale * local).expand(len(views), -1, -1, -1)[None].float(),
            world_points=(scale * world @ rotation.T + shift)[None].float(),
            depth=(scale * depth).expand(len(views), -1, -1)[None].float(),
            intrinsics=intrinsics[None].float(),
        )


def walk_poses(count: int) -> torch.Tensor:
    """Camera-to-world poses turning about y and drifting sideways, view by view."""
    poses = torch.eye(4, dtype=torch.float64).repeat(count, 1, 1)
    for index in range(count):
        angle = 0.08 * index
        poses[index, :3, :3] = torch.tensor(
            [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
        )
        poses[index, :3, 3] = torch.tensor([0.3 * index, 0.02 * index**2, 0.1 * index])
    return poses


def write_grey_views(folder, levels) -> None:
    """One flat grey view per level (the stand-in model recognises a view by its grey level)."""
    folder.mkdir()
    for index, level in enumerate(levels):
        Image.new("RGB", (112, 56), (GREY_BASE + GREY_STEP * level,) * 3).save(folder / f"{index:03d}.png")


def known_local_points(height: int, width: int) -> torch.Tensor:
    """The camera-frame points `KnownGeometry` gives every view of `height` x `width` pixels."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    depth = 2 + 0.3 * torch.sin(columns / 7.0) * torch.cos(rows / 5.0)
    return torch.stack([(columns - width / 2) / width * depth, (rows - height / 2) / width * depth, depth], -1).double()


def test_chunked_outputs_match_the_known_geometry(small_views_model, tmp_path, monkeypatch):
    count = 19
    folder, scene, sparse = tmp_path / "views", tmp_path / "scene", tmp_path / "sparse"
    write_grey_views(folder, range(count))
    truth = walk_poses(count)
    processor = AutoProcessor.from_pretrained(small_views_model)
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: KnownGeometry(processor, truth))
    args = ["reconstruct", "--model", str(small_views_model), "--folder", str(folder), "--chunk-size", "6",
            "--overlap", "2", "--output", str(scene), "--colmap", str(sparse), "--device", "cpu"]  # fmt: skip
    assert g2vlm(args) == 0

    written = torch.tensor([c["camera_to_world"] for c in json.loads((scene / "cameras.json").read_text())["cameras"]], dtype=torch.float64)  # fmt: skip
    assert written.shape == (count, 4, 4)
    # relative to the first camera the merged trajectory is the truth, rotations exactly, translations at one scale
    relative = torch.linalg.inv(written[0]) @ written
    expected = torch.linalg.inv(truth[0]) @ truth
    torch.testing.assert_close(relative[:, :3, :3], expected[:, :3, :3], atol=1e-4, rtol=0)
    scale = relative[-1, :3, 3].norm() / expected[-1, :3, 3].norm()
    extent = expected[:, :3, 3].norm(dim=-1).max()
    assert (relative[:, :3, 3] / scale - expected[:, :3, 3]).norm(dim=-1).max() < 1e-4 * extent

    # the point cloud is every view's true surface, moved by the one similarity that maps the truth to the output
    depth_maps = sorted(path.name for path in (scene / "depth").iterdir())
    assert depth_maps == sorted([f"view_{i:03d}.png" for i in range(count)] + [f"view_{i:03d}_preview.png" for i in range(count)])  # fmt: skip
    width, height = Image.open(scene / "depth" / "view_000.png").size
    rotation = written[0, :3, :3] @ truth[0, :3, :3].T
    shift = written[0, :3, 3] - scale * rotation @ truth[0, :3, 3]
    world = torch.einsum("nij,hwj->nhwi", truth[:, :3, :3], known_local_points(height, width)) + truth[:, None, None, :3, 3]  # fmt: skip
    cloud = torch.from_numpy(np.asarray(trimesh.load(scene / "points.ply").vertices, dtype=np.float64))
    assert cloud.shape == (count * height * width, 3)
    error = (cloud - (scale * world.reshape(-1, 3) @ rotation.T + shift)).norm(dim=-1).max()
    assert error < 1e-4 * scale * extent

    # the COLMAP model holds the same cameras (world-to-camera) and one observed point per pixel
    lines = [line for line in (sparse / "images.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 2 * count
    translations = torch.tensor([[float(v) for v in line.split()[5:8]] for line in lines[::2]], dtype=torch.float64)
    from_poses = -torch.einsum("nji,nj->ni", written[:, :3, :3], written[:, :3, 3])
    torch.testing.assert_close(translations, from_poses, atol=1e-4 * float(scale * extent), rtol=1e-4)
    points = [line for line in (sparse / "points3D.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(points) == count * height * width
