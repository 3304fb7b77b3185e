"""Output folders that never lose data: validate, stage beside the target, swap in only when complete.

Used by `g2vlm-convert` and `g2vlm reconstruct`. A run writes into a hidden staging folder next to the target
(`.NAME.g2vlm-staging.XXXX`); when everything is written, the previous output (if any) is renamed aside
(`.NAME.g2vlm-old.XXXX`), the staging folder takes its name and the old one is removed. Every folder this module
creates holds a marker file, so the next run can recognise (and remove) what an interrupted run left behind.

One writer at a time: `output_lock` holds an advisory lock on `.NAME.g2vlm-lock` beside the target (holding the pid,
host and command of its writer) from the checks to the swap. A second writer is refused with the first one named;
the operating system releases the lock of a killed process, so its lock file is simply taken over.

This module moves whole folders; the single files it writes itself (the staging marker) go through the package's one
file writer, `g2vlm_hf.export.atomic`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from transformers.utils import logging

from .export.atomic import current_umask, write_text_atomic

logger = logging.get_logger(__name__)

MARKER = ".g2vlm-output"
STAGING_INFIX = ".g2vlm-staging."
OLD_INFIX = ".g2vlm-old."
LOCK_SUFFIX = ".g2vlm-lock"


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
    is a file or lies under a file, a location this process cannot write to, a name too long for the file system, and
    an existing non-empty folder unless `overwrite` is set and the folder is recognisably a previous output (`MARKER`
    or `is_previous_output`).
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
    writable_parent = next(parent for parent in resolved.parents if parent.exists())
    if not os.access(writable_parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"Output {output}: cannot write in {writable_parent} (read-only or no permission); choose another folder."
        )
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
    """Remove the staging/old folders (and the lock file) an interrupted run left beside `output`: only folders
    holding `MARKER`, never a staging folder whose writer still runs, never a lock file that a process holds."""
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
            if infix == STAGING_INFIX and _writer_is_alive(leftover / MARKER):
                logger.warning(f"Kept {leftover}: the process that writes it is still running.")
                continue
            if leftover.is_dir() and (infix == OLD_INFIX or (leftover / MARKER).is_file()):
                shutil.rmtree(leftover, ignore_errors=True)
                logger.warning(f"Removed {leftover}, left behind by an interrupted run.")
                removed.append(leftover)
    _remove_stale_lock(output)
    return removed


def _remove_stale_lock(output: Path) -> None:
    """Remove the lock file a killed writer left beside `output` (one nobody holds; a held one, ours included, stays)."""
    path = lock_path(output)
    if not path.is_file():
        return
    with open(path, "a+", encoding="utf-8") as handle:
        handle.seek(0)
        if _try_lock(handle):
            path.unlink(missing_ok=True)


def make_staging_dir(output: Path) -> Path:
    """A new marked, world-readable staging folder beside `output` (after cleaning earlier leftovers)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_INFIX}", dir=output.parent))
    staging.chmod(0o777 & ~current_umask())
    write_text_atomic(
        staging / MARKER,
        "Written by g2vlm-hf; a staging folder if its name starts with a dot.\n" + json.dumps(_writer()) + "\n",
    )
    return staging


def swap_in(staging: Path, output: Path, *, keep_marker: bool = True) -> Path:
    """Move the complete `staging` folder to `output`, replacing a previous output only now."""
    return swap_in_all([(staging, output)], keep_marker=keep_marker)[0]


def swap_in_all(pairs: Sequence[tuple[Path, Path]], *, keep_marker: bool = True) -> list[Path]:
    """Move each complete staging folder to its output as one step: if one move fails, the outputs already
    replaced get their previous content back before the error is raised."""
    done: list[tuple[Path, Path, Path | None]] = []  # (staging, output, old) of the swaps made
    try:
        for staging, output in pairs:
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
            done.append((staging, output, old))
    except OSError:
        for staging, output, old in reversed(done):
            os.rename(output, staging)
            if old is not None:
                os.rename(old, output)
        raise
    for _, _, old in done:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return [output for _, output, _ in done]


@contextlib.contextmanager
def staged_outputs(outputs: Sequence[str | os.PathLike[str]], *, keep_marker: bool = True) -> Iterator[list[Path]]:
    """One transaction over several output folders: lock each, yield a staging folder per output, and swap them all
    in when the block ends without an error. The staging folders are always removed and the locks released, so a
    failure or Ctrl-C leaves every previous output as it was."""
    with contextlib.ExitStack() as stack:
        for output in outputs:
            stack.enter_context(output_lock(output))
        stagings: list[Path] = []
        stack.callback(_remove_folders, stagings)  # after a swap they are gone; after a failure, the new content
        for output in outputs:
            stagings.append(make_staging_dir(Path(output)))
        yield list(stagings)
        swap_in_all(list(zip(stagings, [Path(output) for output in outputs])), keep_marker=keep_marker)


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of `output`: `.NAME.g2vlm-lock` beside it."""
    output = Path(output)
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the writer's lock of `output` (creating its parent folders) until the block ends.

    Raises:
        OutputError: another live process holds it (its pid, host and command are named), or the lock file cannot
            be written.
    """
    path = lock_path(Path(output).expanduser().resolve())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path)
    except OSError as error:
        raise OutputError(f"Output {output}: cannot create its lock file {path} ({error}).") from error
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked, so that no other writer holds a lock on a removed file
        handle.close()


def _acquire(path: Path):
    """Open `path` and lock it without waiting; retry when the file was replaced meanwhile."""
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115  (closed by output_lock or on failure)
        try:
            handle.seek(0)  # msvcrt locks bytes from the current position: always the first one
            if not _try_lock(handle):
                raise OutputError(_held_message(path, handle.read()))
            try:
                replaced = not os.path.samestat(os.fstat(handle.fileno()), path.stat())
            except FileNotFoundError:
                replaced = True
            if replaced:  # its previous holder removed it between our open and our lock
                handle.close()
                continue
            # written in place, not through the atomic writer: the lock belongs to this open file, which a rename
            # would replace; a reader of a half-written record only gets a vaguer message (`_held_message`)
            handle.truncate()
            handle.write(json.dumps(_writer()) + "\n")
            handle.flush()
            return handle
        except BaseException:
            handle.close()
            raise


def _try_lock(handle) -> bool:
    """Take an exclusive, non-blocking lock on the open file; False when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


COMMAND_SHOWN_CHARS = 160


def _command() -> str:
    """This process's command line, shortened, with the value of a `--token` hidden (lock files are readable)."""
    words = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"]
    for word in sys.argv[1:]:
        if word.startswith("--token="):
            word = "--token=***"
        elif words[-1] == "--token":
            word = "***"
        words.append(word)
    command = " ".join(words)
    return command if len(command) <= COMMAND_SHOWN_CHARS else command[: COMMAND_SHOWN_CHARS - 3] + "..."


def _writer() -> dict:
    """Who is writing: recorded in lock files and staging markers."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _held_message(path: Path, content: str) -> str:
    try:
        writer = json.loads(content)
        who = f"process {writer['pid']} on {writer['host']} (`{writer['command']}`, started {writer['since']})"
    except (ValueError, KeyError, TypeError):
        who = "another process"
    output = path.parent / path.name[1 : -len(LOCK_SUFFIX)]
    return (
        f"Output {output} is being written by {who}, which holds {path}; wait for it to finish, or choose another "
        "output."
    )


def _writer_is_alive(marker: Path) -> bool:
    """Whether the process recorded in a staging marker may still run (a writer on another host is assumed alive)."""
    try:
        writer = json.loads(marker.read_text(encoding="utf-8").splitlines()[-1])
        pid, host = int(writer["pid"]), writer["host"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False  # no writer recorded (older versions): a leftover
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


__all__ = [
    "MARKER",
    "OutputError",
    "check_output_dir",
    "clean_leftovers",
    "lock_path",
    "make_staging_dir",
    "output_lock",
    "staged_outputs",
    "swap_in",
    "swap_in_all",
]
