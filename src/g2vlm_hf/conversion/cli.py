"""`g2vlm-convert`: official G²VLM checkpoint folder -> transformers folder."""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging

from .convert_official import convert_official_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g2vlm-convert",
        description=(
            "Convert an official G2VLM checkpoint folder (text_config.json, vit_config.json, dino_config.json, "
            "model.safetensors, tokenizer files) into a folder loadable with "
            "transformers' AutoModelForImageTextToText.from_pretrained (after `import g2vlm_hf`)."
        ),
    )
    parser.add_argument("input_dir", help="official checkpoint folder")
    parser.add_argument("output_dir", help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.set_verbosity_warning()
    try:
        output = convert_official_checkpoint(
            args.input_dir, args.output_dir, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"g2vlm-convert: error: {error}", file=sys.stderr)
        return 2
    print(f"Converted checkpoint written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
