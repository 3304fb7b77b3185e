"""Running a parsed `g2vlm` command: every expected problem ends as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import chat, reconstruct
from .errors import CLIError
from .parser import build_parser, quiet_import_warnings

COMMANDS = {"reconstruct": reconstruct.run, "chat": chat.run}


def run(args: argparse.Namespace) -> int:
    """Run the command of `args` (as `build_parser` made them); returns the exit status."""
    try:
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        return COMMANDS[args.command](args)
    except (CLIError, ValueError, OSError) as error:
        sys.stdout.flush()
        print(f"g2vlm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("g2vlm: interrupted; no output was written or replaced.", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """`g2vlm` with `argv` (default: the process's arguments)."""
    quiet_import_warnings()
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
