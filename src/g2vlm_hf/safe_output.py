"""Output folders that never lose data: validate, stage beside the target, swap in only when complete.

Used by `g2vlm-convert` and `g2vlm reconstruct`. A run writes into a hidden staging folder next to the target
(`.NAME.g2vlm-staging.XXXX`); when everything is written, the previous output (if any) is renamed aside
(`.NAME.g2vlm-old.XXXX`), the staging folder takes its name and the old one is removed. Every folder this module
creates holds a marker file, so the next run can recognise (and remove) what an interrupted run left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

MARKER = ".g2vlm-output"
STAGING_INFIX = ".g2vlm-staging."
OLD_INFIX = ".g2vlm-old."


class OutputError(ValueError):
    """An output path that cannot be used without risking data loss."""


def _is_within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output_dir(
    output: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    is_previous_output: Callable[[Path], bool] | None = None,
) -> Path:
    """Validate `output` before any work; return it resolved.

    Refused: the current folder (or one of its ancestors), an ancestor of an input or an input itself, a path that
    is a file or lies under a file, a name too long for the file system, and an existing non-empty folder unless
    `overwrite` is set and the folder is recognisably a previous output (`MARKER` or `is_previous_output`).
    """
    output = Path(output)
    too_long = [part for part in output.parts if len(part.encode()) + 40 > 255]  # + room for the staging suffix
    if too_long:
        raise OutputError(f"Output {output}: the name {too_long[0][:40]}... is too long for the file system.")
    resolved = output.expanduser().resolve()
    if _is_within(Path.cwd().resolve(), resolved):
        raise OutputError(f"Output {output} is the current folder or contains it; choose a new folder.")
    for source in inputs:
        source = Path(source).expanduser().resolve()
        if _is_within(source, resolved):
            raise OutputError(f"Output {output} is the input {source} or contains it; choose another folder.")
        if _is_within(resolved, source) and source.is_dir():
            raise OutputError(f"Output {output} lies inside the input {source}; choose a folder outside it.")
    for parent in [resolved, *resolved.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == resolved else f"lies under the file {parent}"
                raise OutputError(f"Output {output} {where}; give a folder path.")
            break
    if resolved.is_dir() and any(resolved.iterdir()):
        if not overwrite:
            raise OutputError(f"Output {output} exists and is not empty; pass --overwrite to replace it.")
        recognised = (resolved / MARKER).is_file() or (is_previous_output is not None and is_previous_output(resolved))
        if not recognised:
            raise OutputError(
                f"Output {output} exists but is not a previous output of g2vlm; --overwrite only replaces those. "
                "Choose another folder or remove it yourself."
            )
    return resolved


def clean_leftovers(output: Path) -> list[Path]:
    """Remove the staging/old folders an interrupted run left beside `output` (only ones holding `MARKER`)."""
    output = Path(output)
    removed = []
    if not output.parent.is_dir():
        return removed
    for infix in (OLD_INFIX, STAGING_INFIX):
        for leftover in output.parent.glob(f".{output.name}{infix}*"):
            if infix == OLD_INFIX and leftover.is_dir() and not output.exists():
                os.rename(leftover, output)  # killed between the two renames of swap_in: restore the old output
                logger.warning(f"Restored {output} from {leftover}, left behind by an interrupted run.")
                continue
            if leftover.is_dir() and (infix == OLD_INFIX or (leftover / MARKER).is_file()):
                shutil.rmtree(leftover, ignore_errors=True)
                logger.warning(f"Removed {leftover}, left behind by an interrupted run.")
                removed.append(leftover)
    return removed


def make_staging_dir(output: Path) -> Path:
    """A new marked, world-readable staging folder beside `output` (after cleaning earlier leftovers)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_INFIX}", dir=output.parent))
    staging.chmod(0o777 & ~_umask())
    (staging / MARKER).write_text("Written by g2vlm-hf; a staging folder if its name starts with a dot.\n")
    return staging


def swap_in(staging: Path, output: Path, *, keep_marker: bool = True) -> Path:
    """Move the complete `staging` folder to `output`, replacing a previous output only now."""
    staging, output = Path(staging), Path(output)
    if not keep_marker:
        (staging / MARKER).unlink(missing_ok=True)
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}{OLD_INFIX}", dir=output.parent))
        os.rmdir(old)
        os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary new file gets (0644 under the usual umask 022)."""
    return 0o666 & ~_umask()


__all__ = ["MARKER", "OutputError", "check_output_dir", "clean_leftovers", "file_mode", "make_staging_dir", "swap_in"]
