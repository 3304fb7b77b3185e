"""`g2vlm-convert`: official G²VLM checkpoint folder -> transformers folder, optionally pushed to the Hub.

g2vlm-convert INPUT OUTPUT                                  # full model (chat + reconstruction)
g2vlm-convert INPUT OUTPUT --reconstruction-only            # no ViT, no LM head; loads with AutoModel
g2vlm-convert INPUT OUTPUT --push-to-hub user/g2vlm-2b      # ... then upload OUTPUT (a re-run resumes)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# Nothing heavy at the top: `g2vlm-convert --help` and argument errors are answered before torch and transformers are
# imported (the package and the converter are imported inside `main`, once the command line is parsed).


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="g2vlm-convert",
        description=(
            "Convert an official G2VLM checkpoint folder (text_config.json, vit_config.json, dino_config.json, "
            "model.safetensors, tokenizer files) into a folder loadable with "
            "transformers' AutoModelForImageTextToText.from_pretrained (after `import g2vlm_hf`), and optionally "
            "push it to the Hugging Face Hub with its remote code and a model card."
        ),
    )
    parser.add_argument("input_dir", help="official checkpoint folder")
    parser.add_argument(
        "output_dir",
        help="folder to write: new or empty, or an earlier g2vlm-convert output with --overwrite; not the input, nor "
        "the current folder",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--reconstruction-only",
        action="store_true",
        help="write (and push) the reconstruction-only model: no semantic ViT, no LM head; loads with AutoModel",
    )
    hub = parser.add_argument_group(
        "Hub", "Upload OUTPUT after converting. If OUTPUT already holds a converted checkpoint of the requested kind "
        "and --overwrite is not given, it is pushed as it is (re-run the same command to resume a failed push)."
    )  # fmt: skip
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="Hub repository to create or update (namespace/name)")
    hub.add_argument("--private", action="store_true", help="create the repository as private")
    hub.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    hub.add_argument("--commit-message", metavar="MSG", help="commit message")
    hub.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the saved login)")
    hub.add_argument(
        "--example-images", nargs="+", default=[], metavar="FILE", help="images the model card's snippets use"
    )
    hub.add_argument("--base-model", help="card metadata (default: the official InternRobotics/G2VLM-2B-MoT)")
    hub.add_argument("--source", help="where the official weights came from, for the card (default: INPUT's name)")
    hub.add_argument("--source-revision", help="revision of the official weights, for the card")
    hub.add_argument(
        "--parity", action="append", default=[], metavar="CHECK=RESULT", help="a parity figure for the card (repeat)"
    )
    hub.add_argument("--no-verify", action="store_true", help="skip downloading the files back to compare sha256")
    return parser


def parse_parity(items: list[str]) -> dict[str, str]:
    parity = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--parity expects CHECK=RESULT, got {item!r}.")
        parity[name.strip()] = value.strip()
    return parity


def convert(args: argparse.Namespace) -> Path:
    """Convert INPUT into OUTPUT (full or reconstruction-only); reuse OUTPUT when pushing without --overwrite."""
    from ..safe_output import check_output_dir, staged_outputs
    from .convert_official import convert_official_checkpoint
    from .reconstruction_only import OUTPUT_KIND, read_model_type, write_reconstruction_only

    output = Path(args.output_dir)
    wanted = "g2vlm_reconstruction" if args.reconstruction_only else "g2vlm"
    if args.push_to_hub and output.exists() and not args.overwrite:
        found = read_model_type(output)
        if found != wanted:
            raise FileExistsError(
                f"{output} holds a {found!r} checkpoint but {wanted!r} is requested; pass --overwrite or choose "
                "another OUTPUT."
            )
        print(f"{output} already holds a converted checkpoint: pushing it as it is (--overwrite converts again).")
        return output
    if not args.reconstruction_only:
        output = convert_official_checkpoint(
            args.input_dir, output, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
        print(f"Converted checkpoint written to {output}")
        return output
    check_output_dir(output, kind=OUTPUT_KIND, inputs=[args.input_dir], overwrite=args.overwrite)
    with staged_outputs([output], kinds=[OUTPUT_KIND], overwrite=args.overwrite) as (staging,):
        full = staging / ".full-model"  # inside the staging folder, so that a killed run leaves one leftover
        convert_official_checkpoint(args.input_dir, full, max_shard_size=args.max_shard_size)
        write_reconstruction_only(full, staging, max_shard_size=args.max_shard_size)
        shutil.rmtree(full)
    print(f"Reconstruction-only checkpoint written to {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    from .hub import HubPushError, push_to_hub, resolve_token, validate_hub_repo_id
    from .model_card import DEFAULT_BASE_MODEL

    logging.set_verbosity_warning()
    try:
        parity = parse_parity(args.parity)
        if args.push_to_hub:  # fail before a long conversion
            validate_hub_repo_id(args.push_to_hub)
            token = resolve_token(args.token)
        output = convert(args)
        if not args.push_to_hub:
            return 0
        result = push_to_hub(
            output,
            args.push_to_hub,
            private=args.private or None,
            revision=args.revision,
            commit_message=args.commit_message,
            token=token,
            reconstruction_only=args.reconstruction_only,
            example_images=args.example_images,
            base_model=args.base_model or DEFAULT_BASE_MODEL,
            source=args.source or Path(args.input_dir).resolve().name,
            source_revision=args.source_revision,
            parity=parity,
            max_shard_size=args.max_shard_size,
            verify=not args.no_verify,
        )
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as error:
        print(f"g2vlm-convert: error: {error}", file=sys.stderr)
        return 2
    except HubPushError as error:
        print(f"g2vlm-convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"g2vlm-convert: interrupted; {args.output_dir} was left as it was.", file=sys.stderr)
        return 130
    checked = "" if args.no_verify else f"; {len(result.files)} files verified by sha256"
    print(f"Pushed to {result.repo_id}@{result.revision}: commit {result.commit_oid}{checked}")
    print(f"  {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
