"""`g2vlm reconstruct` beyond the scene files: intrinsics in cameras.json (processed and original size), a COLMAP model
(`--colmap`, read back with pycolmap) and an answer about the scene (`--ask`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from g2vlm_hf.cli import main as g2vlm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import greedy_answer
from hub_testing import VIEWS, fast_tiny_copy

pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")
QUESTION = "Which view is closest to the red box?"


@pytest.fixture(scope="module")
def folder(converted_tiny, tmp_path_factory) -> Path:
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("cli3d") / "model")


def test_reconstruct_with_colmap_and_ask(folder, tmp_path, capsys):
    pycolmap = pytest.importorskip("pycolmap", reason='COLMAP read-back needs pycolmap: pip install -e ".[test]"')
    out, sparse = tmp_path / "scene", tmp_path / "sparse"
    arguments = ["reconstruct", "--model", str(folder), *map(str, VIEWS), "--output", str(out)]
    assert g2vlm([*arguments, "--colmap", str(sparse), "--ask", QUESTION, "--max-new-tokens", "4"]) == 0

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = model.reconstruct(**processor(geometry_images=[str(v) for v in VIEWS], return_tensors="pt"))
    height, width = expected.depth.shape[-2:]

    cameras = json.loads((out / "cameras.json").read_text())["cameras"]
    for index, camera in enumerate(cameras):
        intrinsics = np.array(camera["intrinsics"])
        np.testing.assert_allclose(intrinsics, expected.intrinsics[0, index].numpy(), rtol=1e-5, atol=1e-5)
        with Image.open(VIEWS[index]) as image:
            assert (camera["original"]["width"], camera["original"]["height"]) == image.size
            scale = np.array([[image.width / width], [image.height / height], [1.0]])
        np.testing.assert_allclose(np.array(camera["original"]["intrinsics"]), intrinsics * scale, rtol=1e-12)

    # COLMAP holds the views whose fitted camera is a pinhole one (random weights give some focal lengths <= 0)
    focal = expected.intrinsics[0, :, [0, 1], [0, 1]]
    usable = [index for index in range(len(VIEWS)) if (focal[index] > 0).all()]
    assert usable, "the fixture's random weights no longer give any usable camera; pick other views"
    reconstruction = pycolmap.Reconstruction()
    reconstruction.read_text(str(sparse))
    assert sorted(reconstruction.images) == [index + 1 for index in usable]
    assert reconstruction.num_points3D() == len(usable) * height * width
    for index in usable:
        image = reconstruction.images[index + 1]
        np.testing.assert_allclose(
            image.cam_from_world().matrix(),
            np.linalg.inv(expected.camera_poses[0, index].double().numpy())[:3],
            atol=1e-5,
        )
        params = reconstruction.cameras[index + 1].params
        k = expected.intrinsics[0, index]
        np.testing.assert_allclose(params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-5)

    answer = json.loads((out / "answer.json").read_text())
    assert answer["question"] == QUESTION and answer["views"] == [view.name for view in VIEWS]
    reference = greedy_answer(model, processor, [str(view) for view in VIEWS], QUESTION, 4)
    assert answer["answer"] == reference
    assert f"A: {reference}" in capsys.readouterr().out

    previews = sorted(p.name for p in (out / "depth").glob("*_preview.png"))
    assert previews == [f"view_{i:03d}_preview.png" for i in range(len(VIEWS))]


def test_empty_question_is_a_readable_error(folder, tmp_path, capsys):
    arguments = ["reconstruct", "--model", str(folder), *map(str, VIEWS), "--output", str(tmp_path / "o"), "--ask", " "]
    assert g2vlm(arguments) == 2
    assert "--ask needs a question" in capsys.readouterr().err
