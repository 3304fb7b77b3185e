"""`g2vlm-eval depth|points|poses|vqa`: run a G²VLM checkpoint over a data set in the documented folder formats,
print a table of the metrics and write them (with per-scene / per-question results) to a JSON file."""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging

from ..export.atomic import write_json_atomic
from ..model_loading import check_device, check_model_path
from ..processing.image_io import displayed_size
from .datasets import GeometryScene, Question, find_scenes, load_questions
from .depth import evaluate_depth, weighted_mean
from .parser import build_parser
from .points import evaluate_point_maps
from .poses import relative_pose_errors, summarize_pose_errors
from .predict import answer_question, load_model, predict_geometry
from .vqa import score_answer, summarize_vqa


def load_data(args: argparse.Namespace) -> list:
    """The task's scenes or questions, read and checked before the model is loaded."""
    if args.task == "vqa":
        return load_questions(args.data)[: args.limit]
    return find_scenes(args.data, args.task)[: args.limit]


def run_depth(args: argparse.Namespace, model, processor, scenes: list[GeometryScene]) -> tuple[dict, list[dict]]:
    per_scene = []
    for scene in logging.tqdm(scenes, desc="depth", unit="scene"):
        size = scene.depth.shape[1:3]
        if args.single_view:  # monocular protocol: every view reconstructed on its own
            views = [
                predict_geometry(model, processor, [path], size, args.device, args.geometry_width)["depth"]
                for path in scene.image_paths
            ]
            depth = np.concatenate(views)
        else:
            prediction = predict_geometry(model, processor, scene.image_paths, size, args.device, args.geometry_width)
            depth = prediction["depth"]
        try:
            metrics = evaluate_depth(
                depth,
                scene.depth,
                scene.valid,
                alignment=args.alignment,
                per_frame=not args.per_sequence,
                max_depth=args.max_depth,
                clip_max=args.clip_max,
            )
        except ValueError as error:
            raise ValueError(f"Scene {scene.name}: {error}") from error
        per_scene.append({"scene": scene.name, **metrics})
    return weighted_mean(per_scene, "valid_pixels"), per_scene


def run_points(args: argparse.Namespace, model, processor, scenes: list[GeometryScene]) -> tuple[dict, list[dict]]:
    per_scene = []
    for scene in logging.tqdm(scenes, desc="points", unit="scene"):
        prediction = predict_geometry(
            model, processor, scene.image_paths, scene.points.shape[1:3], args.device, args.geometry_width
        )
        metrics = evaluate_point_maps(
            prediction["world_points"],
            scene.points,
            scene.valid,
            align=not args.no_align,
            icp_distance=args.icp_distance,
            normals=args.normals,
            device=args.device,
        )
        per_scene.append({"scene": scene.name, **metrics})
    keys = [key for key in per_scene[0] if key not in ("scene", "scale", "valid_points")]
    summary = {key: float(np.mean([row[key] for row in per_scene])) for key in keys}  # mean over scenes
    summary["valid_points"] = sum(row["valid_points"] for row in per_scene)
    summary["scenes"] = len(per_scene)
    return summary, per_scene


def run_poses(args: argparse.Namespace, model, processor, scenes: list[GeometryScene]) -> tuple[dict, list[dict]]:
    per_scene, pooled = [], defaultdict(lambda: ([], []))
    for scene in logging.tqdm(scenes, desc="poses", unit="scene"):
        width, height = displayed_size(scene.image_paths[0])
        size = (height, width)
        prediction = predict_geometry(model, processor, scene.image_paths, size, args.device, args.geometry_width)
        rotation, translation = relative_pose_errors(prediction["camera_poses"], scene.poses, args.pair_direction)
        pooled[scene.category or "(top level)"][0].append(rotation)
        pooled[scene.category or "(top level)"][1].append(translation)
        per_scene.append({"scene": scene.name, **summarize_pose_errors(rotation, translation, args.thresholds)})
    per_category = {
        category: summarize_pose_errors(torch.cat(rotations), torch.cat(translations), args.thresholds)
        for category, (rotations, translations) in sorted(pooled.items())
    }
    keys = [key for key in next(iter(per_category.values())) if key != "pairs"]
    summary = {key: float(np.mean([metrics[key] for metrics in per_category.values()])) for key in keys}
    summary["pairs"] = sum(metrics["pairs"] for metrics in per_category.values())
    summary["categories"] = len(per_category)
    if len(per_category) > 1:
        summary.update({f"auc@30/{category}": m["auc@30"] for category, m in per_category.items()})
    return summary, per_scene


def run_vqa(args: argparse.Namespace, model, processor, questions: list[Question]) -> tuple[dict, list[dict]]:
    rows, scores = [], []
    for question in logging.tqdm(questions, desc="vqa", unit="question"):
        prediction = answer_question(model, processor, question, args.max_new_tokens)
        score = score_answer(question.as_record(), prediction)
        scores.append((question.category, score))
        rows.append({"id": question.id, "category": question.category, "prediction": prediction,
                     "answer": question.answer, "score": score})  # fmt: skip
    return summarize_vqa(scores), rows


TASKS = {"depth": run_depth, "points": run_points, "poses": run_poses, "vqa": run_vqa}


def format_table(task: str, summary: dict) -> str:
    """A two-column text table of the summary metrics."""
    width = max(len(key) for key in summary)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return f"g2vlm-eval {task}\n" + "\n".join(lines)


def check_output_file(path: Path) -> None:
    """A ValueError, before any work, for an `--output` that cannot become the results file: a folder, or a path in a
    folder that cannot be written (the results were written only after the whole evaluation)."""
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give the results file, e.g. {path / 'results.json'}.")
    parent = next(folder for folder in path.absolute().parents if folder.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path} cannot be written: {parent} is not a folder this user can write in.")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.limit is not None and args.limit < 1:
        print("g2vlm-eval: error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        check_output_file(args.output)
        check_device(args.device)
        data = load_data(args)
        check_model_path(args.model)
        model, processor = load_model(args.model, args.dtype, args.device, getattr(args, "geometry_width", None))
        summary, details = TASKS[args.task](args, model, processor, data)
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        write_json_atomic(
            args.output, {"task": args.task, "settings": settings, "metrics": summary, "details": details}
        )
    except (ValueError, OSError) as error:
        print(f"g2vlm-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"g2vlm-eval: interrupted; {args.output} was left as it was.", file=sys.stderr)
        return 130
    print(format_table(args.task, summary))
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
