"""`g2vlm reconstruct`: views of one scene -> scene.glb, points.ply, cameras.json, depth maps (and with --colmap a
COLMAP model, with --ask an answer), in one pass or, with --chunk-size, in overlapping chunks read lazily whose files
are written as each chunk is aligned (host memory set by a chunk and --max-points, not by the number of views)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .. import model_loading
from ..export import check_reconstruction, write_scene
from ..export.colmap import NoUsableCameraError
from ..export.streaming import StreamingSceneWriter
from ..inputs import open_views
from ..reconstruction import reconstruct_in_one_pass, stream_in_chunks, views_for_question
from ..safe_output import staged_outputs
from .checks import (
    check_model_and_device,
    check_reconstruct_flags,
    check_reconstruct_outputs,
    check_view_counts,
)
from .errors import CLIError
from .parser import DEFAULT_MAX_POINTS


def run(args: argparse.Namespace) -> int:
    """Check every flag, path and view count, then reconstruct and write the outputs as one transaction.

    When no view gets a usable pinhole camera, --colmap's target is withdrawn from the transaction (left as it was),
    the scene is still written, and the exit status is 2 with one line saying why."""
    check_reconstruct_flags(args)
    targets = check_reconstruct_outputs(args)
    check_model_and_device(args)
    if args.loop_closure:
        check_loop_closure_installed()
    source = open_views(args.images, args.folder, args.video, args.every, args.max_views)
    processor = model_loading.load_processor(args.model)
    check_view_counts(args, source, processor.geometry_image_processor.max_views)
    if args.chunk_size is None:
        source = source.loaded()  # one pass: every view read (and refused if unreadable) before the model loads
    shown = [args.output, args.colmap][: len(targets)]  # the final paths as the user wrote them
    max_points = args.max_points if args.max_points is not None else DEFAULT_MAX_POINTS
    # one transaction: every target locked against other writers, swapped in together when all is written
    with staged_outputs(
        targets, kinds=("reconstruction", "colmap")[: len(targets)], overwrite=args.overwrite
    ) as stagings:
        colmap = None
        if args.colmap is not None:  # its own staging, or its place inside --output's
            inside = args.colmap.expanduser().resolve().relative_to(targets[0]) if len(stagings) == 1 else None
            colmap = stagings[1] if inside is None else stagings[0] / inside
        model = model_loading.load_model(args.model, args.dtype, args.device, generate=args.ask is not None)
        if args.chunk_size is None:
            written, no_camera = reconstruct_one_pass(args, stagings[0], colmap, model, processor, source, max_points)
        else:
            written, no_camera = reconstruct_streaming(args, stagings[0], colmap, model, processor, source, max_points)
        if no_camera is not None and len(stagings) == 2:  # nothing was written into its staging folder
            stagings.withdraw(1)
    print(f"Reconstructed {len(source)} views into {args.output}:")
    for path in written:
        staging, final = next((s, f) for s, f in zip(stagings, shown) if Path(path).is_relative_to(s))
        print(f"  {final / Path(path).relative_to(staging)}")
    if no_camera is not None:
        sys.stdout.flush()
        print(
            f"g2vlm: error: no COLMAP model was written to {args.colmap} ({no_camera}), but the scene was written to "
            f"{args.output}; --colmap needs a model whose point maps look like a pinhole camera's (real weights, not "
            "random ones).",
            file=sys.stderr,
        )
        return 2
    return 0


def check_loop_closure_installed() -> None:
    """--loop-closure needs scipy (the `loop` extra); refused before any model work when it is missing."""
    from ..loop_closure import require_scipy

    try:
        require_scipy()
    except ImportError as error:
        raise CLIError(str(error)) from None


def reconstruct_one_pass(
    args: argparse.Namespace, folder: Path, colmap: Path | None, model, processor, source, max_points: int
) -> tuple[list[Path], NoUsableCameraError | None]:
    """Every view in one model pass, then the scene (and --colmap, --ask) written from the whole result; returns the
    written files and, when no view has a usable camera, the error that kept the COLMAP model from being written."""
    # one forward pass has no steps to show a bar for: say that it runs (minutes for hundreds of views on a CPU)
    print(f"Reconstructing the {len(source)} views in one pass...", file=sys.stderr, flush=True)
    scene_run = reconstruct_in_one_pass(model, processor, source, resize_views_to_first=args.resize_views)
    # the predictions are checked once, here; the writers of the scene and of --colmap take them as they are
    scene = check_reconstruction(scene_run.output, scene_run.geometry_pixel_values, processor.geometry_image_processor)
    written = write_scene(
        folder,
        scene,
        confidence_percentile=args.confidence_percentile,
        max_points=max_points,
        original_sizes=scene_run.original_sizes,
        view_names=scene_run.names,
    )
    no_camera = None
    if colmap is not None:
        from ..export import write_colmap

        try:
            written += write_colmap(
                colmap, scene, confidence_percentile=args.confidence_percentile, max_points=max_points
            )
        except NoUsableCameraError as error:  # raised before anything of the model is written
            no_camera = error
    if args.ask is not None:
        written.append(ask(args, folder, model, processor, scene_run.views, scene_run.names, None))
    return written, no_camera


def reconstruct_streaming(
    args: argparse.Namespace, folder: Path, colmap: Path | None, model, processor, source, max_points: int
) -> tuple[list[Path], NoUsableCameraError | None]:
    """Views in overlapping chunks, each chunk's files written into the staging `folder` (and `colmap`) as it is
    aligned (`StreamingSceneWriter`, a seeded point budget of `max_points`); the cameras, clouds and COLMAP text at the
    end; a question asked on a few views chosen by --ask-views-by. Returns the written files and, when no view has a
    usable camera, the error that kept the COLMAP model from being written (the scene is written all the same)."""
    with StreamingSceneWriter(folder, colmap_dir=colmap, max_points=max_points, seed=0) as writer:
        stream_in_chunks(
            model,
            processor,
            source,
            writer,
            args.chunk_size,
            args.overlap,
            loop_closure=args.loop_closure,
            resize_views_to_first=args.resize_views,
        )
        # without a usable camera the writer closes with the scene alone instead of failing and discarding it
        no_camera = writer.drop_colmap_without_cameras()
    written = list(writer.written)
    if args.ask is not None:
        poses = np.stack(writer.poses)
        views, names = views_for_question(source, poses, args.ask_views, args.ask_views_by)
        print(f"Asking about {len(names)} views chosen by {args.ask_views_by}: {', '.join(names)}", file=sys.stderr)
        written.append(ask(args, folder, model, processor, views, names, args.ask_views_by))
    return written, no_camera


def ask(
    args: argparse.Namespace, folder: Path, model, processor, views: list, names: list[str], chosen_by: str | None
) -> Path:
    """`--ask QUESTION`: the answer about `views`, printed and written to `answer.json` in `folder` with the views'
    names (and, for a chunked run, how they were chosen)."""
    from ..chat import answer
    from ..export.atomic import write_json_atomic

    reply = answer(model, processor, views, args.ask, args.max_new_tokens, resize_views_to_first=args.resize_views)
    document = {"question": args.ask, "answer": reply, "views": names}
    if chosen_by is not None:
        document["views_chosen_by"] = chosen_by
    print(f"Q: {args.ask}\nA: {reply}")
    return write_json_atomic(Path(folder) / "answer.json", document)
