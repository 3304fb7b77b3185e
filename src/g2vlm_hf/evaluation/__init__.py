"""Evaluation of G²VLM: the metrics of the paper's geometry and spatial-reasoning tables, loaders for simple folder
formats, and the `g2vlm-eval` command (see docs/evaluation.md)."""

from .alignment import (
    adam_l1_scale_shift,
    l1_scale,
    least_squares_scale,
    least_squares_scale_shift,
    median_scale,
    umeyama,
)
from .datasets import GeometryScene, Question, find_scenes, load_questions, write_scene
from .depth import depth_errors, evaluate_depth
from .points import evaluate_point_maps, grid_normals, icp_refine, knn_normals, nearest_neighbours, point_cloud_metrics
from .poses import evaluate_poses, pose_auc, relative_pose_errors
from .vqa import extract_choice, mean_relative_accuracy, parse_number, score_answer, summarize_vqa

__all__ = [
    "GeometryScene",
    "Question",
    "adam_l1_scale_shift",
    "depth_errors",
    "evaluate_depth",
    "evaluate_point_maps",
    "evaluate_poses",
    "extract_choice",
    "find_scenes",
    "grid_normals",
    "icp_refine",
    "knn_normals",
    "l1_scale",
    "least_squares_scale",
    "least_squares_scale_shift",
    "load_questions",
    "mean_relative_accuracy",
    "median_scale",
    "nearest_neighbours",
    "parse_number",
    "point_cloud_metrics",
    "pose_auc",
    "relative_pose_errors",
    "score_answer",
    "summarize_vqa",
    "umeyama",
    "write_scene",
]
