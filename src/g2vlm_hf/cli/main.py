"""Running a parsed `g2vlm` command: every expected problem ends as one line on stderr with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import chat, reconstruct
from .errors import CLIError
from .parser import build_parser

COMMANDS = {"reconstruct": reconstruct.run, "chat": chat.run}


def quiet_import_warnings() -> None:
    """Silence warnings that other packages log when they are imported, not about this run: with torchao installed,
    transformers' quantizers import it, and it reports CUDA extensions it cannot load (and torch's pytree deprecated
    registrations of its enums), lines that would bury the command's own messages."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    """Run the command of `args` (as `build_parser` made them); returns the exit status."""
    quiet_import_warnings()
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
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
