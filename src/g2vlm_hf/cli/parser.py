"""The `g2vlm` command line's arguments, and what must happen before the package is imported. Standard library only:
the `g2vlm` launcher loads this file on its own to answer `--help` and argument errors before torch is imported; the
commands run in the package (`cli.main`)."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
"""`--dtype`'s values, the names of `g2vlm_hf.model_loading.DTYPES` (a test keeps the two equal: this file cannot
import the package)."""

# The exported clouds of many views are randomly subsampled to this many points unless --max-points says otherwise:
# about 30 MB of PLY, still smooth to open in a viewer (one 518x392 view alone has 203,056 points).
DEFAULT_MAX_POINTS = 2_000_000

# Defaults of the flags that only mean something beside others (given alone, they are refused, not ignored):
DEFAULT_OVERLAP = 8  # --overlap, with --chunk-size
DEFAULT_ASK_VIEWS = 8  # --ask-views, with --chunk-size and --ask
DEFAULT_ASK_VIEWS_BY = "coverage"  # --ask-views-by, with --chunk-size and --ask
DEFAULT_CHAT_VIEWS = 8  # chat's --views, with --video


def quiet_import_warnings() -> None:
    """Silence warnings that other packages log when they are imported, not about this run: with torchao installed,
    transformers' quantizers import it, and it reports CUDA extensions it cannot load (and torch's pytree deprecated
    registrations of its enums), lines that would bury the command's own messages. Call before importing g2vlm_hf."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fill_dependent_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Give `reconstruct`'s chunk and question flags left out their defaults (once it is checked that none was given
    without the flags it needs)."""
    args.overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    args.ask_views = DEFAULT_ASK_VIEWS if args.ask_views is None else args.ask_views
    args.ask_views_by = DEFAULT_ASK_VIEWS_BY if args.ask_views_by is None else args.ask_views_by
    return args


def build_parser() -> argparse.ArgumentParser:
    """The parser of `g2vlm reconstruct ...` and `g2vlm chat ...` (the command's name lands in `args.command`)."""
    parser = argparse.ArgumentParser(prog="g2vlm", description="G2VLM: 3D reconstruction and spatial chat.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", required=True, help="converted checkpoint folder or Hub id")
        sub.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights dtype (default: as saved)")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda when available)")
        sub.add_argument(
            "--resize-views", action="store_true", help="resize views of other sizes to the first view's size"
        )
        sub.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")

    recon = commands.add_parser("reconstruct", help="views of one scene -> scene.glb, points.ply, cameras.json, depth")
    common(recon)
    recon.add_argument("images", nargs="*", default=[], help="image files of the views")
    recon.add_argument("--folder", type=Path, help="use the images of this folder, sorted by name (see --every)")
    recon.add_argument("--video", type=Path, help="use frames of this video file")
    recon.add_argument(
        "--every",
        type=int,
        default=None,
        help="keep every N-th view: of a --video's frames (default 10) or of the images (default 1, all)",
    )
    recon.add_argument(
        "--max-views", type=int, default=None, help="keep at most this many views (the first ones, after --every)"
    )
    recon.add_argument("--output", type=Path, required=True, help="output folder (replaced only when complete)")
    recon.add_argument("--overwrite", action="store_true", help="replace an existing output of an earlier run")
    recon.add_argument(
        "--confidence-percentile", type=float, default=None, help="drop points below this confidence percentile"
    )
    recon.add_argument(
        "--max-points",
        type=int,
        default=None,
        help=f"randomly keep at most this many points in the exported clouds (default {DEFAULT_MAX_POINTS:,})",
    )
    recon.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="reconstruct any number of views in overlapping chunks of this many views (e.g. 32; default: one pass, "
        "at most 256 views); the views are read lazily",
    )
    recon.add_argument(
        "--overlap",
        type=int,
        default=None,
        help=f"with --chunk-size: views each chunk shares with the previous (default {DEFAULT_OVERLAP})",
    )
    recon.add_argument(
        "--loop-closure",
        action="store_true",
        help="with --chunk-size: find places the sequence revisits and remove the drift between them (needs scipy: "
        'pip install "g2vlm-hf[loop]"; keeps every chunk until the end)',
    )
    recon.add_argument(
        "--ask-views",
        type=int,
        default=None,
        help=f"with --chunk-size and --ask: ask about at most this many views (default {DEFAULT_ASK_VIEWS})",
    )
    recon.add_argument(
        "--ask-views-by",
        choices=("coverage", "uniform"),
        default=None,
        help="with --chunk-size and --ask: choose those views by coverage of the reconstructed cameras (default; "
        "repeated places are skipped) or uniformly over the sequence",
    )
    recon.add_argument(
        "--colmap", type=Path, default=None, help="also write a COLMAP text model (cameras, images, points3D) here"
    )
    recon.add_argument(
        "--ask", default=None, metavar="QUESTION", help="also answer this question about the views into answer.json"
    )

    chat = commands.add_parser("chat", help="images + question -> streamed answer")
    common(chat)
    chat.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    chat.add_argument("--video", type=Path, help="ask about frames of this video instead")
    chat.add_argument(
        "--views",
        type=int,
        default=None,
        help=f"with --video: this many frames spread uniformly over it (default {DEFAULT_CHAT_VIEWS})",
    )
    chat.add_argument("question", help="the question about the images")
    return parser
