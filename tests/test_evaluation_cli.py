"""`g2vlm-eval` end to end: the converted tiny checkpoint over generated data sets in the documented formats."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_answer
from transformers import AutoModelForImageTextToText, AutoProcessor

from g2vlm_hf.evaluation import cli, write_scene
from g2vlm_hf.evaluation.depth import evaluate_depth
from g2vlm_hf.evaluation.points import evaluate_point_maps
from g2vlm_hf.evaluation.poses import evaluate_poses
from g2vlm_hf.training.synthetic import render_room, yaw_pose

HEIGHT, WIDTH = 20, 28
SCENES = ("chairs/scene_a", "scene_b")


def local_depth(world_points: np.ndarray, poses: np.ndarray) -> np.ndarray:
    rotations, centres = poses[:, :3, :3], poses[:, :3, 3]
    return np.einsum("nji,nhwj->nhwi", rotations, world_points - centres[:, None, None])[..., 2]


@pytest.fixture(scope="module")
def geometry_data(tmp_path_factory):
    """Two scenes (one in a category folder) of two rendered views with depth, points, poses and masks."""
    root = tmp_path_factory.mktemp("geometry")
    for name, offset in zip(SCENES, (0.0, 0.3)):
        poses = np.stack([yaw_pose(offset, -0.5, -8.0), yaw_pose(offset + 0.4, 0.2, 12.0)])
        room = render_room(poses, HEIGHT, WIDTH)
        write_scene(
            root / name,
            room.images,
            depth=local_depth(room.world_points, poses),
            points=room.world_points,
            poses=poses,
            valid=room.valid_mask,
        )
    return root


@pytest.fixture(scope="module")
def tiny(converted_tiny):
    """The converted tiny checkpoint's model and processor, loaded by transformers alone."""
    return AutoModelForImageTextToText.from_pretrained(converted_tiny).eval(), AutoProcessor.from_pretrained(
        converted_tiny
    )


def resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(N, h, w)` or `(N, h, w, C)` maps bilinearly resized to `size` = (H, W)."""
    grid = maps.permute(0, 3, 1, 2) if maps.ndim == 4 else maps[:, None]
    grid = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1) if maps.ndim == 4 else grid[:, 0]


def reference_geometry(model, processor, image_paths: list, width: int) -> dict:
    """Depth, world points (both resized to the ground truth's size) and poses of one scene's views at `width`,
    from the processor and `model.reconstruct` alone: the reference for the CLI's predictions."""
    inputs = processor(geometry_images=[str(path) for path in image_paths], return_tensors="pt", target_width=width)
    with torch.no_grad():
        output = model.reconstruct(**inputs)
    return {
        "depth": resized(output.depth[0], (HEIGHT, WIDTH)).double().numpy(),
        "world_points": resized(output.world_points[0], (HEIGHT, WIDTH)).double().numpy(),
        "camera_poses": output.camera_poses[0].double().numpy(),
    }


def expected_details(model, processor, root, task: str, extra: list[str], width: int) -> list[dict]:
    """Each scene's metrics computed from [`reference_geometry`] and the ground truth (read with numpy) by the metric
    functions, with the CLI's default settings and the options in `extra`."""
    rows = []
    for name in SCENES:
        images = sorted((root / name / "images").iterdir())
        truth = np.load(root / name / "gt.npz")
        if task == "depth":
            if "--single-view" in extra:
                depth = np.concatenate([reference_geometry(model, processor, [p], width)["depth"] for p in images])
            else:
                depth = reference_geometry(model, processor, images, width)["depth"]
            metrics = evaluate_depth(depth, truth["depth"], truth["valid"], per_frame="--per-sequence" not in extra)
        elif task == "points":
            points = reference_geometry(model, processor, images, width)["world_points"]
            metrics = evaluate_point_maps(points, truth["points"], truth["valid"], icp_distance=0.1)
        else:
            metrics = evaluate_poses(
                reference_geometry(model, processor, images, width)["camera_poses"], truth["poses"]
            )
        rows.append({"scene": name, **metrics})
    return rows


def run(task: str, model, data, output, *extra: str) -> int:
    argv = [task, "--model", str(model), "--data", str(data), "--output", str(output), "--device", "cpu", *extra]
    return cli.main(argv)


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("depth", []),
        ("depth", ["--single-view", "--per-sequence"]),
        ("points", ["--icp-distance", "0.1"]),
        ("poses", []),
    ],
)
def test_geometry_tasks_run_the_model_end_to_end(converted_tiny, tiny, geometry_data, tmp_path, capsys, task, extra):
    """Each scene's metrics are those of the model's own reconstruction (`model.reconstruct` on the scene's views at
    the requested width), scored against the ground truth by the metric functions (tested against the reference
    code in their own files)."""
    output = tmp_path / f"{task}.json"
    assert run(task, converted_tiny, geometry_data, output, "--geometry-width", "56", *extra) == 0
    result = json.loads(output.read_text())
    assert result["task"] == task
    assert [row["scene"] for row in result["details"]] == list(SCENES)
    expected = expected_details(*tiny, geometry_data, task, extra, 56)
    for row, wanted in zip(result["details"], expected):
        assert row.keys() == wanted.keys()
        for key, value in wanted.items():
            assert row[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-6)), key
    metrics = result["metrics"]
    if task == "depth":
        assert metrics["valid_pixels"] == 2 * 2 * HEIGHT * WIDTH
        assert 0 <= metrics["delta_1.25"] <= 1 and np.isfinite(metrics["abs_rel"])
    elif task == "points":
        assert metrics["valid_points"] == 2 * 2 * HEIGHT * WIDTH and metrics["accuracy"] > 0
    else:
        assert metrics["pairs"] == 2 and metrics["categories"] == 2 and 0 <= metrics["auc@30"] <= 1
    table = capsys.readouterr().out
    assert f"g2vlm-eval {task}" in table and "results written to" in table
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # no temporary file left behind


def test_a_missing_model_fails_cleanly(geometry_data, tmp_path, capsys):
    output = tmp_path / "result.json"
    assert run("poses", tmp_path / "no-model-here", geometry_data, output) == 2
    assert "g2vlm-eval: error:" in capsys.readouterr().err
    assert not output.exists()


def test_an_output_that_cannot_be_the_results_file_is_refused_before_any_work(geometry_data, tmp_path, capsys):
    """An existing folder, or a path under a file, as --output: refused first (with a missing model too, which would
    be found next); the error came after the whole evaluation."""
    (tmp_path / "results").mkdir()
    (tmp_path / "a-file").write_text("mine")
    for output, message in (
        (tmp_path / "results", "is a folder; give the results file, e.g."),
        (tmp_path / "a-file" / "r.json", "is not a folder this user can write in"),
    ):
        assert run("poses", tmp_path / "no-model-here", geometry_data, output) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"g2vlm-eval: error: --output {output}") and message in error, error
    assert (tmp_path / "a-file").read_text() == "mine" and list((tmp_path / "results").iterdir()) == []


def test_perfect_predictions_score_perfectly_through_the_cli(converted_tiny, geometry_data, tmp_path, monkeypatch):
    """The CLI's plumbing (loading, resizing, alignment, pooling) gives perfect scores to a perfect prediction."""

    def oracle(model, processor, image_paths, size, device, target_width=None):
        scene = next(s for s in cli.find_scenes(geometry_data, "poses") if s.image_paths == list(image_paths))
        scale = 2.0  # an unknown global scale must not matter
        poses = scene.poses.copy()
        poses[:, :3, 3] *= scale
        return {"depth": scale * scene.depth, "world_points": scale * scene.points, "camera_poses": poses}

    monkeypatch.setattr(cli, "predict_geometry", oracle)
    results = {}
    for task, extra in (("depth", ["--alignment", "median"]), ("points", []), ("poses", [])):
        assert run(task, converted_tiny, geometry_data, tmp_path / f"{task}.json", *extra) == 0
        results[task] = json.loads((tmp_path / f"{task}.json").read_text())["metrics"]
    assert results["depth"]["abs_rel"] == pytest.approx(0.0, abs=1e-9) and results["depth"]["delta_1.25"] == 1.0
    assert results["points"]["accuracy"] == pytest.approx(0.0, abs=1e-6)
    assert results["points"]["normal_consistency"] == pytest.approx(1.0)
    assert results["poses"]["auc@30"] == 1.0 and results["poses"]["rra@5"] == 1.0


def test_vqa_runs_generate_in_a_subprocess(converted_tiny, tiny, geometry_data, tmp_path):
    images = sorted((geometry_data / "scene_b" / "images").glob("*.png"))
    questions = tmp_path / "questions.jsonl"
    lines = [
        {"id": "side", "images": [str(images[0]), str(images[1])], "question": "Did the camera move left or right?",
         "choices": ["A. left", "B. right"], "answer": "B", "category": "motion"},
        {"id": "far", "images": [str(images[0])], "question": "How far is the back wall?", "answer": "4.5",
         "type": "numeric", "category": "distance"},
    ]  # fmt: skip
    questions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    output = tmp_path / "out" / "vqa.json"
    command = [sys.executable, "-m", "g2vlm_hf.evaluation.cli", "vqa", "--model", str(converted_tiny)]
    command += ["--data", str(questions), "--output", str(output), "--device", "cpu", "--max-new-tokens", "4"]
    completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "g2vlm-eval vqa" in completed.stdout
    result = json.loads(output.read_text())
    assert result["metrics"]["questions"] == 2
    assert set(result["metrics"]) >= {"overall", "category_mean", "category/motion", "category/distance"}
    # each prediction is the model's greedy answer to the question with VSI-Bench's answer instruction appended
    prompts = {
        "side": "Did the camera move left or right?\nA. left\nB. right\n"
        "Answer with the option's letter from the given choices directly.",
        "far": "How far is the back wall?\nPlease answer the question using a single word or phrase.",
    }
    assert [row["id"] for row in result["details"]] == ["side", "far"]
    for row, line in zip(result["details"], lines):
        expected = greedy_answer(*tiny, line["images"], prompts[line["id"]], 4)
        assert row["prediction"] == expected and expected, row["id"]
        assert 0.0 <= row["score"] <= 1.0


def test_bad_data_fails_cleanly_without_a_result_file(tmp_path, capsys):
    """The data are checked before the model is loaded: a model path that does not exist is never reached."""
    (tmp_path / "scene" / "images").mkdir(parents=True)
    output = tmp_path / "result.json"
    converted_tiny = tmp_path / "no-model-here"
    assert run("depth", converted_tiny, tmp_path, output) == 2
    assert "No scene found" in capsys.readouterr().err
    assert not output.exists()
    (tmp_path / "q.jsonl").write_text("{broken\n")
    assert run("vqa", converted_tiny, tmp_path / "q.jsonl", output) == 2
    assert "line 1: not valid JSON" in capsys.readouterr().err
    assert not output.exists()


def test_dtype_names_load_the_weights_in_that_dtype(converted_tiny):
    """One dtype table for both command lines: a name loads the weights in that dtype, an unknown one is refused."""
    from g2vlm_hf.evaluation.predict import load_model

    model, _ = load_model(str(converted_tiny), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype 'float64'"):
        load_model(str(converted_tiny), "float64")


def test_geometry_width_is_a_per_call_setting(converted_tiny, geometry_data, tmp_path, monkeypatch):
    """`--geometry-width` resizes the views of every scene (the depth maps come back at that width before they are
    resized to the ground truth) and leaves the loaded processor's own width as it was."""
    seen = []  # (width of the views the model is given, the loaded processor's width) of each reconstruction
    real_load = cli.load_model

    def load_spied(*args, **kwargs):
        model, processor = real_load(*args, **kwargs)
        reconstruct = model.reconstruct

        def spied(*call_args, **call_kwargs):
            views = call_kwargs["geometry_pixel_values"]
            seen.append((views.shape[-1], processor.geometry_image_processor.target_width))
            return reconstruct(*call_args, **call_kwargs)

        model.reconstruct = spied
        return model, processor

    monkeypatch.setattr(cli, "load_model", load_spied)
    assert run("depth", converted_tiny, geometry_data, tmp_path / "depth.json", "--geometry-width", "28") == 0
    assert len(seen) == len(SCENES) and all(width == 28 for width, _ in seen)
    saved_width = AutoProcessor.from_pretrained(converted_tiny).geometry_image_processor.target_width
    assert saved_width != 28 and all(width == saved_width for _, width in seen)  # the loaded processor, untouched
