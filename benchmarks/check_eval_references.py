"""Check g2vlm_hf.evaluation against the public reference implementations, on the same arrays.

Nothing is fetched or copied: point the script at checkouts you made, and it loads the named reference functions
from their files (only those functions, by parsing the file, so that the heavy imports of the evaluation scripts,
hydra, open3d, cv2, the models, are not needed):

    git clone https://github.com/rbler1234/G2VLM   # InternRobotics/G2VLM + eval_code/recons: Pi3's evaluation
                                                    # suite as G2VLM ran it (depth, mv_recon, relpose); checked at ba4836ac
    git clone https://github.com/facebookresearch/vggt   # evaluation/test_co3d.py; checked at 851d2571
    git clone https://github.com/EvolvingLMMs-Lab/lmms-eval       # tasks/{vsibench,sparbench,mindcube}/utils.py
    python benchmarks/check_eval_references.py --g2vlm-dir G2VLM --vggt-dir vggt --lmms-eval-dir lmms-eval

Each flag is optional; the checks of the absent ones are skipped. The G²VLM depth and point-cloud references
import scipy, the whole-ETH3D-protocol check open3d (pip install scipy open3d; neither is a dependency of
g2vlm-hf). Prints one row per metric: ours, the reference, and the largest absolute difference over all cases.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import numpy as np
import torch

from g2vlm_hf.evaluation import (
    evaluate_depth,
    evaluate_point_maps,
    mean_relative_accuracy,
    pose_auc,
    relative_pose_errors,
    umeyama,
)
from g2vlm_hf.evaluation.points import nearest_neighbours
from g2vlm_hf.evaluation.vqa import extract_choice
from g2vlm_hf.training.synthetic import render_room, yaw_pose


def load_functions(path: Path, names: list[str], namespace: dict | None = None) -> dict:
    """Execute only the top-level functions `names` (and simple constants) of the file `path` into a namespace."""
    if not path.is_file():
        raise SystemExit(f"Reference file {path} not found: check the checkout path.")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise SystemExit(f"{path} has no function(s) {sorted(missing)}: a different version of the reference?")
    namespace = {"np": np, "torch": torch, **(namespace or {})}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def scene_arrays(seed: int):
    """A rendered room (3 views) and its exact depth, points and camera-to-world poses, plus a perturbed prediction."""
    rng = np.random.default_rng(seed)
    poses = np.stack([yaw_pose(rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-30, 30)) for _ in range(4)])
    room = render_room(poses, 30, 40)
    local = np.einsum("nji,nhwj->nhwi", poses[:, :3, :3], room.world_points - poses[:, None, None, :3, 3])
    return room, poses, local[..., 2].astype(np.float64), rng


ROWS: list[tuple[str, float, float, float]] = []


def record(metric: str, ours: list[float], reference: list[float]) -> None:
    ours_array, reference_array = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    ROWS.append((metric, float(ours_array.mean()), float(reference_array.mean()),
                 float(np.abs(ours_array - reference_array).max())))  # fmt: skip


def check_depth(recons: Path, seeds: range) -> None:
    reference = load_functions(
        recons / "utils" / "depth.py", ["depth_evaluation", "depth2disparity", "absolute_value_scaling2"]
    )["depth_evaluation"]
    per_key: dict[str, tuple[list, list]] = {}
    for seed in seeds:
        _, _, depth, rng = scene_arrays(seed)
        prediction = depth * rng.uniform(0.3, 3.0) * np.exp(rng.normal(0, 0.15, depth.shape))
        cases = {
            "depth median per frame": ({"alignment": "median", "per_frame": True}, {}),
            "depth l1-scale per frame (NYU)": (
                {"alignment": "l1-scale", "per_frame": True},
                {"align_with_scale": True},
            ),
            "depth l1-scale per sequence (Sintel)": (
                {"alignment": "l1-scale", "per_frame": False, "max_depth": 70, "clip_max": 70},
                {"align_with_scale": True, "max_depth": 70, "post_clip_max": 70},
            ),
            "depth adam-l1-scale-shift per sequence (video scale&shift)": (
                {"alignment": "adam-l1-scale-shift", "per_frame": False},
                {"align_with_lad2": True},
            ),
            "depth lstsq-scale-shift per sequence": (
                {"alignment": "lstsq-scale-shift", "per_frame": False},
                {"align_with_lstsq": True},
            ),
        }
        for name, (ours_kwargs, reference_kwargs) in cases.items():
            ours = evaluate_depth(prediction, depth, **ours_kwargs)
            if ours_kwargs["per_frame"]:
                frames = [reference(p, g, max_depth=None, **reference_kwargs)[0] for p, g in zip(prediction, depth)]
                weights = [frame["valid_pixels"] for frame in frames]
                theirs = {key: np.average([f[key] for f in frames], weights=weights) for key in frames[0]}
            else:
                kwargs = {"max_depth": None, **reference_kwargs}
                theirs = reference(torch.from_numpy(prediction), torch.from_numpy(depth), **kwargs)[0]
            for ours_key, their_key in (("abs_rel", "Abs Rel"), ("delta_1.25", "δ < 1.25"), ("rmse", "RMSE")):
                pair = per_key.setdefault(f"{name}: {ours_key}", ([], []))
                pair[0].append(ours[ours_key])
                pair[1].append(float(theirs[their_key]))
    for name, (ours, theirs) in per_key.items():
        record(name, ours, theirs)


def check_points(recons: Path, seeds: range) -> None:
    namespace = load_functions(recons / "mv_recon" / "utils.py", ["umeyama", "accuracy", "completion"])
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        print("skipping the point-cloud accuracy/completeness reference: it needs scipy", file=sys.stderr)
        cKDTree = None
    namespace["KDTree"] = cKDTree
    scales, ref_scales, rotations, accuracies, ref_acc, comps, ref_comp, ncs, ref_ncs = ([] for _ in range(9))
    for seed in seeds:
        room, _, _, rng = scene_arrays(seed)
        gt = room.world_points.reshape(-1, 3).astype(np.float64)
        angle = rng.uniform(0, np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        prediction = rng.uniform(0.2, 5) * gt @ rotation.T + rng.normal(0, 1, 3) + rng.normal(0, 0.02, gt.shape)
        scale, found_rotation, _ = umeyama(prediction, gt)
        c, r, _ = namespace["umeyama"](prediction.T, gt.T)
        scales.append(scale)
        ref_scales.append(c)
        rotations.append(float(np.abs(found_rotation.numpy() - r).max()))
        if cKDTree is None:
            continue
        aligned = c * prediction @ r.T + _reference_translation(namespace, prediction, gt)
        normals_pred, normals_gt = rng.normal(size=gt.shape), rng.normal(size=gt.shape)
        normals_pred /= np.linalg.norm(normals_pred, axis=1, keepdims=True)
        normals_gt /= np.linalg.norm(normals_gt, axis=1, keepdims=True)
        to_gt, index = nearest_neighbours(aligned, gt)
        to_pred, _index_back = nearest_neighbours(gt, aligned)
        accuracies.append(float(to_gt.mean()))
        comps.append(float(to_pred.mean()))
        ncs.append(float(np.abs((normals_gt[index.numpy()] * normals_pred).sum(-1)).mean()))
        acc, _, nc1, _ = namespace["accuracy"](gt, aligned, normals_gt, normals_pred)
        comp, _, _, _ = namespace["completion"](gt, aligned, normals_gt, normals_pred)
        ref_acc.append(acc)
        ref_comp.append(comp)
        ref_ncs.append(nc1)
    record("umeyama scale", scales, ref_scales)
    record("umeyama rotation (max entry diff)", rotations, [0.0] * len(rotations))
    if accuracies:
        record("point accuracy (mean NN distance)", accuracies, ref_acc)
        record("point completeness", comps, ref_comp)
        record("normal consistency (accuracy side)", ncs, ref_ncs)


def check_point_pipeline(recons: Path, seeds: range) -> None:
    """The whole ETH3D protocol of G2VLM's mv_recon/eval.py (Umeyama, ICP at 0.1, Open3D normals, Acc/Comp/NC)."""
    try:
        import open3d as o3d
        from scipy.spatial import cKDTree
    except ImportError:
        print("skipping the ETH3D pipeline check: it needs open3d and scipy", file=sys.stderr)
        return
    namespace = load_functions(recons / "mv_recon" / "utils.py", ["umeyama", "accuracy", "completion"])
    namespace["KDTree"] = cKDTree
    keys = ("accuracy", "completeness", "nc_accuracy", "nc_completeness")
    ours, theirs = {key: [] for key in keys}, {key: [] for key in keys}
    for seed in seeds:
        room, _, _, rng = scene_arrays(seed)
        gt = room.world_points.astype(np.float64)
        angle = rng.uniform(0, np.pi)
        rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
        prediction = rng.uniform(0.5, 2) * gt @ rotation.T + rng.normal(0, 1, 3) + rng.normal(0, 0.01, gt.shape)
        prediction[..., 2] += 0.05 * np.sin(gt[..., 0])  # a smooth warp that the similarity cannot remove
        valid = room.valid_mask
        metrics = evaluate_point_maps(prediction, gt, valid, icp_distance=0.1, normals="knn")
        for key in keys:
            ours[key].append(metrics[key])
        c, r, t = namespace["umeyama"](prediction[valid].T, gt[valid].T)
        aligned = (c * np.einsum("nhwj, ij -> nhwi", prediction, r) + t.T)[valid].reshape(-1, 3)
        cloud, cloud_gt = o3d.geometry.PointCloud(), o3d.geometry.PointCloud()
        cloud.points = o3d.utility.Vector3dVector(aligned)
        cloud_gt.points = o3d.utility.Vector3dVector(gt[valid].reshape(-1, 3))
        icp = o3d.pipelines.registration.registration_icp(
            cloud, cloud_gt, 0.1, np.eye(4), o3d.pipelines.registration.TransformationEstimationPointToPoint()
        )
        cloud = cloud.transform(icp.transformation)
        cloud.estimate_normals()
        cloud_gt.estimate_normals()
        normals, normals_gt = np.asarray(cloud.normals), np.asarray(cloud_gt.normals)
        acc, _, nc1, _ = namespace["accuracy"](cloud_gt.points, cloud.points, normals_gt, normals)
        comp, _, nc2, _ = namespace["completion"](cloud_gt.points, cloud.points, normals_gt, normals)
        for key, value in zip(keys, (acc, comp, nc1, nc2)):
            theirs[key].append(value)
    for key in keys:
        record(f"ETH3D protocol (Umeyama+ICP 0.1+Open3D normals): {key}", ours[key], theirs[key])


def _reference_translation(namespace: dict, prediction: np.ndarray, gt: np.ndarray) -> np.ndarray:
    return namespace["umeyama"](prediction.T, gt.T)[2][:, 0]


def check_poses(label: str, file: Path, utils: Path, direction: str, seeds: range) -> None:
    helpers = load_functions(utils / "rotation.py", ["mat_to_quat", "_sqrt_positive_part", "standardize_quaternion"])
    helpers.update(load_functions(utils / "geometry.py", ["closed_form_inverse_se3"]))
    helpers["F"] = torch.nn.functional
    reference = load_functions(
        file,
        [
            "build_pair_index",
            "rotation_angle",
            "translation_angle",
            "compare_translation_by_angle",
            "calculate_auc_np",
            "se3_to_relative_pose_error",
        ],
        helpers,
    )
    rot, ref_rot, trans, ref_trans, aucs, ref_aucs = ([] for _ in range(6))
    for seed in seeds:
        _, poses, _, rng = scene_arrays(seed)
        predicted = poses.copy()
        for pose in predicted:  # independent small rotation and position errors per camera
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            angle = np.radians(rng.uniform(0, 25))
            k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            pose[:3, :3] = pose[:3, :3] @ (np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k)
            pose[:3, 3] += rng.normal(0, 0.3, 3)
        r_ours, t_ours = relative_pose_errors(predicted, poses, direction)
        w2c_pred = torch.from_numpy(np.linalg.inv(predicted))
        w2c_gt = torch.from_numpy(np.linalg.inv(poses))
        r_ref, t_ref = reference["se3_to_relative_pose_error"](w2c_pred, w2c_gt, len(poses))
        rot += r_ours.tolist()
        ref_rot += r_ref.tolist()
        trans += t_ours.tolist()
        ref_trans += t_ref.tolist()
        aucs.append(pose_auc(r_ours, t_ours))
        ref_aucs.append(float(reference["calculate_auc_np"](r_ref.numpy(), t_ref.numpy(), 30)[0]))
    record(f"{label}: relative rotation error (deg)", rot, ref_rot)
    record(f"{label}: relative translation angle (deg)", trans, ref_trans)
    record(f"{label}: AUC@30 per scene", aucs, ref_aucs)


def check_vqa(lmms: Path) -> None:
    tasks = lmms / "lmms_eval" / "tasks"
    grid = [(p, t) for t in (0.5, 1.0, 2.0, 3.7, 12.0) for p in np.linspace(0, 2.5 * t, 201)]
    for task in ("vsibench", "sparbench"):
        reference = load_functions(tasks / task / "utils.py", ["mean_relative_accuracy", "abs_dist_norm"])
        theirs = [float(reference["mean_relative_accuracy"](p, t, 0.5, 0.95, 0.05)) for p, t in grid]
        record(f"MRA vs {task} ({len(grid)} pairs)", [mean_relative_accuracy(p, t) for p, t in grid], theirs)
    mindcube = load_functions(tasks / "mindcube" / "utils.py", ["extract_answer"], {"re": __import__("re")})
    responses = ["A", "B.", "C. left of the chair", "The answer is D", "Answer: B", "(C)", "D. behind", "A. yes",
                 "I think B", "My answer is C", "<Answer> D", "**B**", "The correct option is (A).", "B) two",
                 "b", "two", "Between B and C, unsure"]  # fmt: skip
    choices = ["A. one", "B. two", "C. three", "D. four"]
    ours = [extract_choice(r, choices) == mindcube["extract_answer"](r) for r in responses]
    for response, agree in zip(responses, ours):
        if not agree:
            print(f"MindCube differs on {response!r}: ours {extract_choice(response, choices)!r}, "
                  f"MindCube {mindcube['extract_answer'](response)!r}", file=sys.stderr)  # fmt: skip
    record(f"MCQ letter vs MindCube extract_answer (agreeing share of {len(responses)})", ours, [1.0] * len(ours))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--g2vlm-dir", type=Path, help="checkout of github.com/InternRobotics/G2VLM")
    parser.add_argument("--vggt-dir", type=Path, help="checkout of facebookresearch/vggt, branch evaluation")
    parser.add_argument("--lmms-eval-dir", type=Path, help="checkout of EvolvingLMMs-Lab/lmms-eval")
    parser.add_argument("--seeds", type=int, default=5, help="random scenes per check")
    args = parser.parse_args(argv)
    seeds = range(args.seeds)
    if args.g2vlm_dir:
        recons = args.g2vlm_dir / "eval_code" / "recons"
        check_depth(recons, seeds)
        check_points(recons, seeds)
        check_point_pipeline(recons, seeds)
        utils = recons / "models" / "vggt" / "utils"
        check_poses("G2VLM relpose", recons / "relpose" / "metric.py", utils, "i_to_j", seeds)
    if args.vggt_dir:
        utils = args.vggt_dir / "vggt" / "utils"
        check_poses("VGGT test_co3d", args.vggt_dir / "evaluation" / "test_co3d.py", utils, "j_to_i",
                    seeds)  # fmt: skip
    if args.lmms_eval_dir:
        check_vqa(args.lmms_eval_dir)
    if not ROWS:
        parser.error("give at least one of --g2vlm-dir, --vggt-dir, --lmms-eval-dir")
    width = max(len(row[0]) for row in ROWS)
    print(f"{'metric':<{width}}  {'ours':>12}  {'reference':>12}  {'max |diff|':>10}")
    for metric, ours, theirs, difference in ROWS:
        print(f"{metric:<{width}}  {ours:>12.6f}  {theirs:>12.6f}  {difference:>10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
