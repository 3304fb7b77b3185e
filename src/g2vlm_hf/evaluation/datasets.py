"""Loaders (and a writer) for the documented evaluation folder formats (see docs/evaluation.md).

Geometry (depth, points, poses): one folder per scene (nested folders allowed; the parent path is the scene's
category), holding `images/` (the views, sorted by file name) and `gt.npz` with any of
`depth` `(N, H, W)` float metres (0 = no ground truth), `points` `(N, H, W, 3)` world points,
`poses` `(N, 4, 4)` camera-to-world (OpenCV axes), `valid` `(N, H, W)` bool.

Spatial VQA: one JSONL file, one question per line:
`{"id": str, "images": [paths relative to the file], "question": str, "answer": str,
"choices": [str] (multiple choice; answer is the letter), "type": "multiple_choice"|"numeric"|"exact",
"category": str, "prompt": str (optional, replaces the built prompt)}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..inputs import is_image_file
from .vqa import parse_number

GT_FILE = "gt.npz"
GT_SHAPES = {"depth": (None, None, None), "points": (None, None, None, 3), "poses": (None, 4, 4), "valid": (None,) * 3}
PIXEL_MAPS = ("depth", "points", "valid")
"""Ground truth given per pixel: its `(H, W)` must be the images' size."""


@dataclass
class GeometryScene:
    """One scene: its views and the ground truth present in its `gt.npz`."""

    name: str
    category: str
    image_paths: list[Path]
    depth: np.ndarray | None = None
    points: np.ndarray | None = None
    poses: np.ndarray | None = None
    valid: np.ndarray | None = None


@dataclass
class Question:
    """One spatial VQA item."""

    id: str
    image_paths: list[Path]
    question: str
    answer: str
    choices: list[str] = field(default_factory=list)
    type: str = "multiple_choice"
    category: str = "all"
    prompt: str | None = None

    def as_record(self) -> dict:
        return {"id": self.id, "answer": self.answer, "choices": self.choices, "type": self.type}


def _check_shape(name: str, array: np.ndarray, where: Path) -> None:
    expected = GT_SHAPES[name]
    if array.ndim != len(expected) or any(e is not None and e != s for e, s in zip(expected, array.shape)):
        shape = {"depth": "(N, H, W)", "points": "(N, H, W, 3)", "poses": "(N, 4, 4)", "valid": "(N, H, W)"}[name]
        raise ValueError(f"{where}: '{name}' has shape {array.shape}; expected {shape}.")


def _check_dtype(name: str, array: np.ndarray, where: Path) -> None:
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not (numeric or array.dtype == np.bool_):
        raise ValueError(
            f"{where}: '{name}' holds {array.dtype} values; ground truth must be an array of numbers (write it with "
            "float values, e.g. np.asarray(values, dtype=np.float32))."
        )


def _check_poses(scene: str, poses: np.ndarray, where: Path) -> None:
    """Refuse camera-to-world poses that are not finite or whose last row is not [0, 0, 0, 1] (scoring them would
    write NaN or nonsense into the results)."""
    bad = sorted({int(view) for view in np.nonzero(~np.isfinite(poses).all(axis=(1, 2)))[0]})
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"Scene {scene}: {where} 'poses' holds NaN or infinite values (view(s) {shown}); fix its ground truth or "
            "move the scene out of the data folder."
        )
    if not np.allclose(poses[:, 3], [0.0, 0.0, 0.0, 1.0], atol=1e-5):
        raise ValueError(
            f"Scene {scene}: {where} 'poses' must be 4x4 camera-to-world matrices with last row [0, 0, 0, 1]."
        )


def load_scene(directory: Path, root: Path, require: str) -> GeometryScene:
    """Read one scene folder; `require` is the ground-truth key the task needs ("depth", "points" or "poses")."""
    images_dir = directory / "images"
    image_paths = sorted(p for p in images_dir.glob("*") if p.is_file() and is_image_file(p))
    if not image_paths:
        raise ValueError(f"{images_dir}: no images (.png/.jpg) found; each scene needs its views in images/.")
    gt_path = directory / GT_FILE
    try:
        with np.load(gt_path) as archive:
            arrays = {key: archive[key] for key in archive.files if key in GT_SHAPES}
    except (OSError, ValueError) as error:
        raise ValueError(f"{gt_path}: cannot read the ground truth ({error}).") from error
    if require not in arrays:
        raise ValueError(f"{gt_path}: no '{require}' array; this task needs it (keys found: {sorted(arrays)}).")
    for key, array in arrays.items():
        _check_dtype(key, array, gt_path)
        _check_shape(key, array, gt_path)
        if array.shape[0] != len(image_paths):
            raise ValueError(f"{gt_path}: '{key}' has {array.shape[0]} views but {images_dir} has {len(image_paths)}.")
    relative = directory.relative_to(root)
    category = relative.parent.as_posix() if relative.parent != Path(".") else ""
    name = relative.as_posix() if relative != Path(".") else directory.name
    _check_image_sizes(name, image_paths, {key: arrays[key] for key in PIXEL_MAPS if key in arrays})
    if require == "poses":
        _check_poses(name, arrays["poses"], gt_path)
    if require == "depth":
        depth = arrays["depth"]
        usable = np.isfinite(depth) & (depth > 0)
        if "valid" in arrays:
            usable &= arrays["valid"].astype(bool)
        if not usable.any():
            raise ValueError(
                f"Scene {name}: {gt_path} holds no valid depth (every value is NaN, infinite, <= 0 or masked out by "
                "'valid'); fix its ground truth or move the scene out of the data folder."
            )
    return GeometryScene(
        name=name,
        category=category,
        image_paths=image_paths,
        depth=arrays.get("depth"),
        points=arrays.get("points"),
        poses=arrays.get("poses"),
        valid=arrays.get("valid").astype(bool) if "valid" in arrays else None,
    )


def _check_image_sizes(scene: str, image_paths: list[Path], maps: dict[str, np.ndarray]) -> None:
    """Refuse per-pixel ground truth whose `(H, W)` is not every image's displayed size (scoring it would resize the
    prediction onto pixels it does not describe)."""
    from ..processing.image_io import displayed_size

    if not maps:
        return
    key, array = next(iter(maps.items()))
    expected = tuple(array.shape[1:3])
    for path in image_paths:
        width, height = displayed_size(path)
        if (height, width) != expected:
            raise ValueError(
                f"Scene {scene}: image {path.name} is {height}x{width} (H x W) but the ground truth '{key}' is "
                f"{expected[0]}x{expected[1]}; the ground truth must be given at the images' size."
            )
    for other, values in maps.items():
        if tuple(values.shape[1:3]) != expected:
            raise ValueError(
                f"Scene {scene}: ground truth '{other}' is {values.shape[1]}x{values.shape[2]} but '{key}' is "
                f"{expected[0]}x{expected[1]}; give them at the images' size."
            )


def find_scenes(root: Path | str, require: str) -> list[GeometryScene]:
    """Every scene under `root` (each folder holding a `gt.npz`), sorted by path. A folder whose `images/` holds
    images but which has no `gt.npz` is refused (named): a mean silently over fewer scenes would not be comparable."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Data folder {root} does not exist.")
    folders = sorted(path.parent for path in root.rglob(GT_FILE))
    without = sorted(
        path.parent.relative_to(root).as_posix() or "."
        for path in root.rglob("images")
        if path.is_dir()
        and not (path.parent / GT_FILE).is_file()
        and any(is_image_file(image) for image in path.iterdir())
    )
    if without:
        shown = ", ".join(without[:5]) + (", ..." if len(without) > 5 else "")
        raise ValueError(
            f"{len(without)} scene folder(s) under {root} have images/ but no {GT_FILE}: {shown}. Add their ground "
            "truth, or move them out of the data folder."
        )
    if not folders:
        raise ValueError(f"No scene found under {root}: each scene folder needs images/ and {GT_FILE}.")
    return [load_scene(folder, root, require) for folder in folders]


def write_scene(directory: Path | str, images: np.ndarray, **ground_truth: np.ndarray) -> Path:
    """Write one scene in the documented format: `images` `(N, H, W, 3)` uint8, ground truth as keyword arrays
    (`depth`, `valid` `(N, H, W)` and `points` `(N, H, W, 3)` at the images' size, `poses` `(N, 4, 4)`). Everything
    is checked before anything is written; the values themselves are not (the evaluation checks them when it reads
    the scene)."""
    from PIL import Image

    directory = Path(directory)
    unknown = set(ground_truth) - set(GT_SHAPES)
    if unknown:
        raise ValueError(f"Unknown ground-truth keys {sorted(unknown)}; use {sorted(GT_SHAPES)}.")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(
            f"`images` must be (N, H, W, 3) uint8 with N >= 1, got {images.dtype} of shape {images.shape}; convert "
            "float images in [0, 1] with (images * 255).round().astype(np.uint8)."
        )
    arrays = {key: np.asarray(value) for key, value in ground_truth.items()}
    where = directory / GT_FILE
    for key, array in arrays.items():
        _check_dtype(key, array, where)
        _check_shape(key, array, where)
        if array.shape[0] != len(images):
            raise ValueError(f"{where}: '{key}' has {array.shape[0]} views but there are {len(images)} images.")
        if key in PIXEL_MAPS and array.shape[1:3] != images.shape[1:3]:
            raise ValueError(
                f"{where}: '{key}' is {array.shape[1]}x{array.shape[2]} but the images are "
                f"{images.shape[1]}x{images.shape[2]}; give the ground truth at the images' size."
            )
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(directory / "images" / f"{index:04d}.png")
    np.savez(where, **arrays)
    return directory


def load_questions(path: Path | str) -> list[Question]:
    """Parse a JSONL question file, checking every line; image paths are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Question file {path} does not exist.")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg}); write one JSON object per line.") from error
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}.")
        missing = [key for key in ("question", "answer", "images") if key not in item]
        if missing:
            raise ValueError(f"{where}: missing {missing}; every line needs question, answer and images.")
        if not isinstance(item["images"], list) or not item["images"]:
            raise ValueError(f"{where}: 'images' must be a non-empty list of image paths.")
        images = [(path.parent / image).resolve() for image in item["images"]]
        absent = [str(image) for image in images if not image.is_file()]
        if absent:
            raise ValueError(f"{where}: image files not found: {absent}.")
        choices = list(item.get("choices") or [])
        kind = item.get("type", "multiple_choice" if choices else "numeric")
        if kind == "multiple_choice" and not choices:
            raise ValueError(f"{where}: a multiple_choice question needs 'choices'.")
        if kind not in ("multiple_choice", "numeric", "exact"):
            raise ValueError(f"{where}: unknown type {kind!r}; use multiple_choice, numeric or exact.")
        answer = str(item["answer"]).strip()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if kind == "multiple_choice" and answer.upper() not in letters:
            raise ValueError(f"{where}: the answer {answer!r} must be one of the option letters {letters}.")
        if kind == "numeric" and parse_number(answer) in (None, 0.0):
            raise ValueError(f"{where}: a numeric answer must be a non-zero number, got {answer!r}.")
        questions.append(
            Question(
                id=str(item.get("id", number)),
                image_paths=images,
                question=str(item["question"]),
                answer=answer,
                choices=[str(c) for c in choices],
                type=kind,
                category=str(item.get("category", "all")),
                prompt=item.get("prompt"),
            )
        )
    if not questions:
        raise ValueError(f"{path} holds no questions.")
    return questions
