"""`g2vlm chat`: images (or frames of a video) + a question -> the answer, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from .. import model_loading
from ..inputs import image_views, spread_video_views
from .checks import check_answer_flags, check_model_and_device
from .errors import CLIError
from .parser import DEFAULT_CHAT_VIEWS


def run(args: argparse.Namespace) -> int:
    """Check the question, flags, model path, device and views, then load the model and stream its answer."""
    from transformers import TextStreamer

    from ..chat import answer

    if not args.question.strip():
        raise CLIError("The question is empty; ask something about the images.")
    check_answer_flags(args)
    check_model_and_device(args)
    if (args.image != []) == (args.video is not None):
        raise CLIError("Give the images with --image (repeat for several) or a video with --video (exactly one).")
    if args.video is None and args.views is not None:
        raise CLIError("--views picks frames of a --video; with --image every image given is asked about.")
    views = DEFAULT_CHAT_VIEWS if args.views is None else args.views
    source = image_views(args.image) if args.video is None else spread_video_views(args.video, views)
    images = list(source) if args.video is None else None  # image files: refused if unreadable before any loading
    processor = model_loading.load_processor(args.model)
    source.check_at_most(processor.geometry_image_processor.max_views, "ask about fewer views.")
    if images is None:  # frames: counted, then decoded once their number is known to fit
        print(f"Asking about {len(source)} frames: {', '.join(source.names)}", file=sys.stderr)
        images = list(source)
    model = model_loading.load_model(args.model, args.dtype, args.device)
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
