"""`g2vlm reconstruct`: views of one scene -> scene.glb, points.ply, cameras.json, depth maps (and with --colmap a
COLMAP model, with --ask an answer), in one pass or, with --chunk-size, in overlapping chunks read lazily."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import model_loading
from ..export import SceneArrays, check_reconstruction, write_scene
from ..inputs import open_views
from ..reconstruction import SceneRun, reconstruct_in_chunks, reconstruct_in_one_pass, views_for_question
from ..safe_output import staged_outputs
from .checks import (
    check_model_and_device,
    check_reconstruct_flags,
    check_reconstruct_outputs,
    check_view_counts,
)
from .parser import DEFAULT_MAX_POINTS


def run(args: argparse.Namespace) -> int:
    """Check every flag, path and view count, then reconstruct and write the outputs as one transaction."""
    check_reconstruct_flags(args)
    targets = check_reconstruct_outputs(args)
    check_model_and_device(args)
    source = open_views(args.images, args.folder, args.video, args.every, args.max_views)
    processor = model_loading.load_processor(args.model)
    check_view_counts(args, source, processor.geometry_image_processor.max_views)
    if args.chunk_size is None:
        source = source.loaded()  # one pass: every view read (and refused if unreadable) before the model loads
    shown = [args.output, args.colmap][: len(targets)]  # the final paths as the user wrote them
    # one transaction: every target locked against other writers, swapped in together when all is written
    with staged_outputs(targets) as stagings:
        model = model_loading.load_model(args.model, args.dtype, args.device)
        resize = {"resize_views_to_first": args.resize_views}
        if args.chunk_size is None:
            scene_run = reconstruct_in_one_pass(model, processor, source, **resize)
        else:
            scene_run = reconstruct_in_chunks(model, processor, source, args.chunk_size, args.overlap, **resize)
        max_points = args.max_points if args.max_points is not None else DEFAULT_MAX_POINTS
        # the predictions are checked once, here; the writers of the scene and of --colmap take them as they are
        scene = check_reconstruction(
            scene_run.output, scene_run.geometry_pixel_values, processor.geometry_image_processor
        )
        written = write_scene(
            stagings[0],
            scene,
            confidence_percentile=args.confidence_percentile,
            max_points=max_points,
            original_sizes=scene_run.original_sizes,
        )
        colmap = None
        if args.colmap is not None:  # its own staging, or its place inside --output's
            inside = args.colmap.expanduser().resolve().relative_to(targets[0]) if len(stagings) == 1 else None
            colmap = stagings[1] if inside is None else stagings[0] / inside
        written += export_extras(args, stagings[0], colmap, model, processor, scene_run, scene, max_points)
    print(f"Reconstructed {len(scene_run.names)} views into {args.output}:")
    for path in written:
        staging, final = next((s, f) for s, f in zip(stagings, shown) if Path(path).is_relative_to(s))
        print(f"  {final / Path(path).relative_to(staging)}")
    return 0


def export_extras(
    args: argparse.Namespace,
    folder: Path,
    colmap: Path | None,
    model,
    processor,
    scene_run: SceneRun,
    scene: SceneArrays,
    max_points: int,
) -> list[Path]:
    """`--colmap DIR` (a COLMAP text model of `scene`, written to `colmap`, the staged place of DIR) and
    `--ask QUESTION` (`answer.json` in `folder`, beside the scene)."""
    from ..chat import answer
    from ..export.atomic import write_json_atomic

    written: list[Path] = []
    if colmap is not None:
        from ..export import write_colmap

        written += write_colmap(
            colmap,
            scene,
            confidence_percentile=args.confidence_percentile,
            max_points=max_points,
        )
    if args.ask is not None:
        views, names = views_for_question(scene_run, processor, args.ask_views)
        reply = answer(model, processor, views, args.ask, args.max_new_tokens, resize_views_to_first=args.resize_views)
        document = {"question": args.ask, "answer": reply, "views": names}
        written.append(write_json_atomic(Path(folder) / "answer.json", document))
        print(f"Q: {args.ask}\nA: {reply}")
    return written
