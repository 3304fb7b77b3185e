"""`g2vlm`: 3D reconstruction and spatial chat from the command line.

    g2vlm reconstruct --model MODEL view1.png view2.png ... --output out/   (or --folder DIR, or --video FILE)
    g2vlm reconstruct --model MODEL views/*.png --output out/ --colmap out/sparse --ask "Which view is closest to the door?"
    g2vlm reconstruct --model MODEL --video walk.mp4 --every 5 --chunk-size 32 --overlap 8 --output out/   (any length)
    g2vlm chat --model MODEL --image room.png "How far is the chair from the door?"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .export import SceneArrays

# torch, transformers and the model code are imported inside the commands, so that `g2vlm --help` answers at once.

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""The weights dtypes of `--dtype` (both command lines); "auto" keeps the saved one. Defined here, in the module the
`g2vlm` launcher loads without the package, and imported by `model_loading` for the other users."""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
SCENE_FILES = {"scene.glb", "points.ply", "cameras.json", "depth", "answer.json", ".g2vlm-output"}
"""What `reconstruct` writes into --output (a --colmap folder inside it must not collide with these)."""
# The exported clouds of many views are randomly subsampled to this many points unless --max-points says otherwise:
# about 30 MB of PLY, still smooth to open in a viewer (one 518x392 view alone has 203,056 points).
DEFAULT_MAX_POINTS = 2_000_000


class CLIError(Exception):
    """A problem with the command line's inputs, reported without a traceback."""


def images_in_folder(folder: Path) -> list[Path]:
    """The image files of `folder`, sorted by name."""
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder.")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CLIError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def video_frames(video: Path, every: int, max_frames: int | None) -> list:
    """Every `every`-th frame of `video` (at most `max_frames`), decoded with PyAV, as PIL images. Fewer than two
    kept frames are refused (unless `max_frames` asks for one): a video is not meant to give a one-view scene."""
    from transformers.utils import logging

    try:
        import av
    except ImportError as error:
        raise CLIError('Reading videos needs PyAV: pip install "g2vlm-hf[video]"') from error
    if not video.is_file():
        raise CLIError(f"Video file {video} does not exist.")
    frames, index = [], -1
    try:
        with av.open(str(video)) as container:
            decoded = container.decode(video=0)
            for index, frame in enumerate(logging.tqdm(decoded, desc="Reading frames", unit="frame")):
                if index % every == 0:
                    frames.append(frame.to_image())
                    if max_frames is not None and len(frames) >= max_frames:
                        break
    except av.FFmpegError as error:
        raise CLIError(f"Cannot decode {video}: {error}") from error
    if not frames:
        raise CLIError(f"{video} holds no video frames.")
    if len(frames) < 2 and max_frames != 1:
        raise CLIError(
            f"--every {every} keeps {len(frames)} of the {index + 1} frames of {video}; a reconstruction needs at "
            f"least 2 views: use a smaller --every (at most {index})."
            if index > 0
            else f"{video} holds a single frame; a reconstruction from a video needs at least 2 views."
        )
    return frames


def check_one_source(args: argparse.Namespace) -> None:
    sources = [args.images != [], args.folder is not None, args.video is not None]
    if sum(sources) != 1:
        raise CLIError("Give the views as image files, or --folder DIR, or --video FILE (exactly one of them).")


def collect_views(args: argparse.Namespace) -> list:
    check_one_source(args)
    if args.video is not None:
        return video_frames(args.video, args.every, args.max_views)
    from transformers.utils import logging

    from .processing.image_io import load_image

    paths = images_in_folder(args.folder) if args.folder is not None else [Path(p) for p in args.images]
    with logging.tqdm(paths, desc="Reading images", unit="image") as bar:  # closed before any error is printed
        return [load_image(path) for path in bar]


def check_model_and_device(model_path: str, device: str) -> None:
    """Fail at once on a local-looking `--model` path that does not exist, or a device this machine lacks."""
    local_looking = model_path.startswith((".", "/", "~")) or "\\" in model_path or model_path.count("/") > 1
    if local_looking and not Path(model_path).expanduser().exists():
        raise CLIError(f"Model folder {model_path} does not exist.")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} was given but CUDA is not available on this machine; use --device cpu.")


def check_reconstruct_args(args: argparse.Namespace) -> list[Path]:
    """Validate the flags and the output folders of `reconstruct` before any model work; return the folders the run
    replaces: --output, and --colmap when it lies outside --output (inside, it is written in --output's staging)."""
    from .safe_output import check_output_dir

    if args.max_points is not None and args.max_points < 1:
        raise CLIError(f"--max-points must be at least 1, got {args.max_points}.")
    if args.confidence_percentile is not None and not 0 <= args.confidence_percentile < 100:
        raise CLIError(f"--confidence-percentile must be in [0, 100), got {args.confidence_percentile}.")
    if args.max_views is not None and args.max_views < 1:
        raise CLIError(f"--max-views must be at least 1, got {args.max_views}.")
    if args.ask is not None and not args.ask.strip():
        raise CLIError("--ask needs a question.")
    if args.chunk_size is not None and args.chunk_size < 2:
        raise CLIError(f"--chunk-size must be at least 2, got {args.chunk_size}.")
    if args.chunk_size is not None and not 1 <= args.overlap < args.chunk_size:
        raise CLIError(f"--overlap must be at least 1 and less than --chunk-size {args.chunk_size}, got {args.overlap}.")
    if args.ask_views < 1:
        raise CLIError(f"--ask-views must be at least 1, got {args.ask_views}.")
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


def is_colmap(folder: Path) -> bool:
    """Whether `folder` holds a COLMAP text model (what --overwrite may replace at --colmap)."""
    return all((folder / name).is_file() for name in ("cameras.txt", "images.txt", "points3D.txt"))


def load(model_path: str, dtype: str, device: str):
    """Model and processor, refusing weights that do not match the config and naming missing tokenizer files."""
    from .model_loading import load_checked

    return load_checked(model_path, dtype, device)


def run_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .export import check_reconstruction, write_scene
    from .safe_output import staged_outputs

    targets = check_reconstruct_args(args)
    check_model_and_device(args.model, args.device)
    shown = [args.output, args.colmap][: len(targets)]  # the final paths as the user wrote them
    # one transaction: every target locked against other writers, swapped in together when all is written
    with staged_outputs(targets, kinds=("reconstruction", "colmap")[: len(targets)], overwrite=args.overwrite) as stagings:
        views = collect_views(args) if args.chunk_size is None else None  # read lazily, chunk by chunk, otherwise
        model, processor = load(args.model, args.dtype, args.device)
        if views is not None:
            max_views = processor.geometry_image_processor.max_views
            if len(views) > max_views:
                raise CLIError(
                    f"{len(views)} views are more than one pass takes (max_views={max_views}): reconstruct them in "
                    "overlapping chunks with --chunk-size 32 --overlap 8 (any number of views), or subsample them "
                    "(--every / --max-views)."
                )
            inputs = processor(
                geometry_images=views, return_tensors="pt", resize_views_to_first=args.resize_views
            ).to(args.device)
            with torch.inference_mode():
                output = model.reconstruct(**inputs)
            pixels, sizes, names = inputs["geometry_pixel_values"], original_sizes(views), view_names(args, len(views))
        else:
            from .cli_chunked import reconstruct_in_chunks, views_for_question

            run = reconstruct_in_chunks(args, model, processor)
            output, pixels, sizes = run.output, run.geometry_pixel_values, run.original_sizes
            views, names = views_for_question(run, processor, args.ask_views) if args.ask is not None else ([], [])
        max_points = args.max_points if args.max_points is not None else DEFAULT_MAX_POINTS
        # the predictions are checked once, here; the writers of the scene and of --colmap take them as they are
        scene = check_reconstruction(output, pixels, processor.geometry_image_processor)
        written = write_scene(
            stagings[0],
            scene,
            confidence_percentile=args.confidence_percentile,
            max_points=max_points,
            original_sizes=sizes,
        )
        colmap = None
        if args.colmap is not None:  # its own staging, or its place inside --output's
            inside = args.colmap.expanduser().resolve().relative_to(targets[0]) if len(stagings) == 1 else None
            colmap = stagings[1] if inside is None else stagings[0] / inside
        written += export_extras(args, stagings[0], colmap, model, processor, views, names, scene, max_points)
    print(f"Reconstructed {output.camera_poses.shape[1]} views into {args.output}:")
    for path in written:
        staging, final = next((s, f) for s, f in zip(stagings, shown) if Path(path).is_relative_to(s))
        print(f"  {final / Path(path).relative_to(staging)}")
    return 0


def original_sizes(views: Sequence) -> list[tuple[int, int]]:
    """`(height, width)` of each view as given (PIL images, paths or arrays), as displayed (EXIF orientation)."""
    from PIL import Image

    from .processing.image_io import load_image

    sizes = []
    for view in views:
        image = view if isinstance(view, Image.Image) else load_image(view)
        sizes.append((image.height, image.width))
    return sizes


def view_names(args: argparse.Namespace, count: int) -> list[str]:
    """How the views are called in answer.json: their file names, or the video's frame numbers."""
    if args.video is not None:
        return [f"{args.video.name}#frame{index * args.every}" for index in range(count)]
    paths = images_in_folder(args.folder) if args.folder is not None else [Path(p) for p in args.images]
    return [path.name for path in paths]


def export_extras(
    args: argparse.Namespace,
    folder: Path,
    colmap: Path | None,
    model,
    processor,
    views: list,
    names: list[str],
    scene: SceneArrays,
    max_points: int,
) -> list[Path]:
    """`--colmap DIR` (a COLMAP text model of `scene`, written to `colmap`, the staged place of DIR) and
    `--ask QUESTION` (`answer.json` in `folder`, beside the scene), asked about `views` (called `names` there)."""
    from .chat import answer
    from .export.atomic import write_json_atomic

    written: list[Path] = []
    if colmap is not None:
        from .export import write_colmap

        written += write_colmap(
            colmap,
            scene,
            confidence_percentile=args.confidence_percentile,
            max_points=max_points,
        )
    if args.ask is not None:
        reply = answer(
            model, processor, views, args.ask, args.max_new_tokens, resize_views_to_first=args.resize_views
        )
        document = {"question": args.ask, "answer": reply, "views": names}
        path = Path(folder) / "answer.json"
        written.append(write_json_atomic(path, document))
        print(f"Q: {args.ask}\nA: {reply}")
    return written


def run_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from .chat import answer
    from .processing.image_io import load_image

    if not args.question.strip():
        raise CLIError("The question is empty; ask something about the images.")
    check_model_and_device(args.model, args.device)
    if (args.image != []) == (args.video is not None):
        raise CLIError("Give the images with --image (repeat for several) or a video with --video (exactly one).")
    if args.video is not None:
        from .cli_chunked import video_views_for_chat

        if args.views < 1:
            raise CLIError(f"--views must be at least 1, got {args.views}.")

        images, names = video_views_for_chat(args.video, args.views)
        print(f"Asking about {len(images)} frames: {', '.join(names)}", file=sys.stderr)
    else:
        images = [load_image(path) for path in args.image]
    model, processor = load(args.model, args.dtype, args.device)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    answer(
        model,
        processor,
        images,
        args.question,
        args.max_new_tokens,
        streamer=streamer,
        resize_views_to_first=args.resize_views,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2vlm", description="G2VLM: 3D reconstruction and spatial chat.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", required=True, help="converted checkpoint folder or Hub id")
        sub.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: as saved)")
        sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
        sub.add_argument(
            "--resize-views", action="store_true", help="resize views of other sizes to the first view's size"
        )

    recon = commands.add_parser("reconstruct", help="views of one scene -> scene.glb, points.ply, cameras.json, depth")
    common(recon)
    recon.add_argument("images", nargs="*", default=[], help="image files of the views")
    recon.add_argument("--folder", type=Path, help="use every image of this folder (sorted by name)")
    recon.add_argument("--video", type=Path, help="use frames of this video file")
    recon.add_argument("--every", type=int, default=10, help="with --video: keep every N-th frame (default 10)")
    recon.add_argument("--max-views", type=int, default=None, help="with --video: keep at most this many frames")
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
        "--overlap", type=int, default=8, help="with --chunk-size: views each chunk shares with the previous (default 8)"
    )
    recon.add_argument(
        "--ask-views",
        type=int,
        default=8,
        help="with --chunk-size and --ask: ask about this many views spread uniformly over the sequence (default 8)",
    )
    recon.add_argument(
        "--colmap", type=Path, default=None, help="also write a COLMAP text model (cameras, images, points3D) here"
    )
    recon.add_argument(
        "--ask", default=None, metavar="QUESTION", help="also answer this question about the views into answer.json"
    )
    recon.add_argument("--max-new-tokens", type=int, default=256, help="with --ask: longest answer in tokens")
    recon.set_defaults(run=run_reconstruct)

    chat = commands.add_parser("chat", help="images + question -> streamed answer")
    common(chat)
    chat.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    chat.add_argument("--video", type=Path, help="ask about frames of this video instead")
    chat.add_argument(
        "--views", type=int, default=8, help="with --video: this many frames spread uniformly over it (default 8)"
    )
    chat.add_argument("question", help="the question about the images")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(run=run_chat)
    return parser


def quiet_import_warnings() -> None:
    """Silence warnings that other packages log when they are imported, not about this run: with torchao installed,
    transformers' quantizers import it, and it reports CUDA extensions it cannot load (and torch's pytree deprecated
    registrations of its enums), lines that would bury the command's own messages."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "every", 1) < 1:
        print("g2vlm: error: --every must be at least 1", file=sys.stderr)
        return 2
    quiet_import_warnings()
    try:
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        return args.run(args)
    except (CLIError, ValueError, OSError) as error:
        sys.stdout.flush()
        print(f"g2vlm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("g2vlm: interrupted; no output was written or replaced.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
