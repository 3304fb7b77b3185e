"""Checks of the flags and paths of `g2vlm reconstruct` and `g2vlm chat`, all made before any model work."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import model_loading
from ..inputs import ViewSource
from ..safe_output import check_output_dir
from .errors import CLIError
from .parser import fill_dependent_defaults

SCENE_FILES = {"scene.glb", "points.ply", "cameras.json", "depth", "answer.json", ".g2vlm-output"}
"""What `reconstruct` writes into --output (a --colmap folder inside it must not collide with these)."""


def check_model_and_device(args: argparse.Namespace) -> None:
    """A local-looking `--model` that does not exist, or a `--device` this machine lacks, stops the run at once."""
    model_loading.check_model_path(args.model)
    model_loading.check_device(args.device)


def check_answer_flags(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")


def check_reconstruct_flags(args: argparse.Namespace) -> None:
    """The values of `reconstruct`'s flags, on their own and together (a flag given without the one it works with is
    refused, not ignored); then the defaults of those left out are filled in."""
    if args.every is not None and args.every < 1:
        raise CLIError(f"--every must be at least 1, got {args.every}.")
    if args.max_views is not None and args.max_views < 1:
        raise CLIError(f"--max-views must be at least 1, got {args.max_views}.")
    if args.max_points is not None and args.max_points < 1:
        raise CLIError(f"--max-points must be at least 1, got {args.max_points}.")
    if args.confidence_percentile is not None and not 0 <= args.confidence_percentile < 100:
        raise CLIError(f"--confidence-percentile must be in [0, 100), got {args.confidence_percentile}.")
    if args.ask is not None and not args.ask.strip():
        raise CLIError("--ask needs a question.")
    if args.chunk_size is not None and args.chunk_size < 2:
        raise CLIError(f"--chunk-size must be at least 2, got {args.chunk_size}.")
    if args.ask_views is not None and args.ask_views < 1:
        raise CLIError(f"--ask-views must be at least 1, got {args.ask_views}.")
    for flag, given in (
        ("--loop-closure", args.loop_closure),
        ("--overlap", args.overlap is not None),
        ("--ask-views", args.ask_views is not None),
        ("--ask-views-by", args.ask_views_by is not None),
    ):
        if given and args.chunk_size is None:
            raise CLIError(
                f"{flag} works on a chunked reconstruction: give --chunk-size too (e.g. 32), or leave {flag} out."
            )
        if given and flag.startswith("--ask-") and args.ask is None:
            raise CLIError(f"{flag} chooses the views --ask asks about: give --ask QUESTION too, or leave {flag} out.")
    fill_dependent_defaults(args)
    if args.chunk_size is not None and not 1 <= args.overlap < args.chunk_size:
        raise CLIError(
            f"--overlap must be at least 1 and less than --chunk-size {args.chunk_size}, got {args.overlap}."
        )
    if args.chunk_size is not None and args.confidence_percentile is not None:
        raise CLIError(
            "--confidence-percentile needs every view's confidence at once; with --chunk-size the points are written "
            "as they stream: leave it out."
        )
    check_answer_flags(args)


def check_reconstruct_outputs(args: argparse.Namespace) -> list[Path]:
    """Check the output folders of `reconstruct`; return the folders the run replaces: --output, and --colmap when it
    lies outside --output (inside, it is written in --output's staging)."""
    inputs = [*args.images, *(path for path in (args.folder, args.video) if path is not None)]
    output = check_output_dir(
        args.output,
        inputs=inputs,
        overwrite=args.overwrite,
        kind="reconstruction",
    )
    if args.colmap is None:
        return [output]
    colmap = args.colmap.expanduser().resolve()
    if colmap == output or colmap in output.parents:
        raise CLIError(f"--colmap {args.colmap} is --output or holds it; give a folder beside or inside --output.")
    if output in colmap.parents:
        first = colmap.relative_to(output).parts[0]
        if first in SCENE_FILES:
            raise CLIError(f"--colmap {args.colmap} collides with the scene's own {first}; choose another name.")
        return [output]
    colmap_target = check_output_dir(args.colmap, inputs=inputs, overwrite=args.overwrite, kind="colmap")
    return [output, colmap_target]


def check_view_counts(args: argparse.Namespace, source: ViewSource, max_views: int) -> None:
    """The counts a model pass takes (the processor's `max_views`): all views in one pass, or a chunk, and the views
    a question is asked on; checked before the model is loaded or any view decoded."""
    if args.chunk_size is None:
        source.check_at_most(
            max_views,
            f"one pass takes at most max_views={max_views}; reconstruct them in overlapping chunks with --chunk-size "
            "32 --overlap 8 (any number of views), or subsample them (--every / --max-views).",
        )
        return
    if args.chunk_size > max_views:
        raise CLIError(f"--chunk-size {args.chunk_size} is more than one pass takes (max_views={max_views}).")
    if args.ask is not None and args.ask_views > max_views:
        raise CLIError(f"--ask-views {args.ask_views} is more than one pass takes (max_views={max_views}).")
