"""The `g2vlm-eval` command line's arguments. Standard library only: the `g2vlm-eval` launcher loads this file on its
own to answer `--help` and argument errors before torch is imported (`evaluation.cli.main` runs the task)."""

from __future__ import annotations

import argparse
from pathlib import Path

# Written out because this file cannot import the package; tests keep them equal to the tables they name.
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")  # g2vlm_hf.model_loading.DTYPES
ALIGNMENT_CHOICES = (  # sorted(g2vlm_hf.evaluation.depth.ALIGNMENTS)
    "adam-l1-scale-shift", "l1-scale", "lstsq-scale", "lstsq-scale-shift", "median", "none",
)  # fmt: skip
PAIR_DIRECTIONS = ("i_to_j", "j_to_i")  # g2vlm_hf.evaluation.poses.PAIR_DIRECTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2vlm-eval", description="Evaluate G2VLM (see docs/evaluation.md).")
    tasks = parser.add_subparsers(dest="task", required=True)

    def common(sub: argparse.ArgumentParser, data_help: str) -> None:
        sub.add_argument("--model", required=True, help="converted checkpoint folder or Hub id")
        sub.add_argument("--data", type=Path, required=True, help=data_help)
        sub.add_argument("--output", type=Path, required=True, help="JSON result file (written atomically)")
        sub.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
        sub.add_argument("--limit", type=int, default=None, help="evaluate only the first N scenes/questions")

    def geometry(sub: argparse.ArgumentParser) -> None:
        common(sub, "folder of scenes (each with images/ and gt.npz)")
        sub.add_argument("--geometry-width", type=int, default=None, help="resize views to this width (default 518)")

    depth = tasks.add_parser("depth", help="AbsRel / delta<1.25 of predicted depth")
    geometry(depth)
    depth.add_argument("--alignment", choices=ALIGNMENT_CHOICES, default="median")
    depth.add_argument("--per-sequence", action="store_true", help="one alignment per scene (video depth)")
    depth.add_argument("--single-view", action="store_true", help="reconstruct each view alone (monocular depth)")
    depth.add_argument("--max-depth", type=float, default=None, help="ignore ground truth beyond this depth")
    depth.add_argument("--clip-max", type=float, default=None, help="clamp aligned predictions to this depth")

    points = tasks.add_parser("points", help="accuracy / completeness / normal consistency of world points")
    geometry(points)
    points.add_argument("--no-align", action="store_true", help="skip the similarity alignment")
    points.add_argument("--icp-distance", type=float, default=None, help="refine by ICP (ETH3D: 0.1, DTU: 100)")
    points.add_argument("--normals", choices=["knn", "grid"], default="knn", help="normals for the consistency")

    poses = tasks.add_parser("poses", help="RRA/RTA at thresholds and AUC@30 over all view pairs")
    geometry(poses)
    poses.add_argument("--thresholds", type=float, nargs="+", default=[5.0, 15.0, 30.0])
    poses.add_argument(
        "--pair-direction", choices=PAIR_DIRECTIONS, default="i_to_j", help="i_to_j: G2VLM/Pi3 code; j_to_i: VGGT"
    )

    vqa = tasks.add_parser("vqa", help="multiple-choice accuracy / mean relative accuracy of answers")
    common(vqa, "JSONL question file")
    vqa.add_argument("--max-new-tokens", type=int, default=32)
    return parser
