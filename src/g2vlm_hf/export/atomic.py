"""The one way this package writes a file: completely or not at all.

The content goes to a temporary file in the destination folder, is flushed to disk (`fsync`), gets the mode an
ordinary new file gets under the process's umask, and is then moved over the destination with `os.replace`. A failure
at any step (the serializer raising, a full disk, Ctrl-C) removes the temporary file and leaves an earlier file of that
name as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "current_umask",
    "file_mode",
    "json_text",
    "write_all_or_nothing",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: the OS offers no plain getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary new file gets (0644 under the usual umask 022)."""
    return 0o666 & ~current_umask()


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Lets `write` fill a temporary file beside `path`, then moves it into place; creates the folder if missing.

    Args:
        path (`str` or `os.PathLike`): The destination file.
        write (`Callable[[IO[bytes]], Any]`): Writes the content to the binary handle it is given.

    Returns:
        `Path`: The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, file_mode())  # mkstemp makes it 0600; an output file gets the usual mode (0644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """[`write_atomic`] of `data`."""
    return write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """[`write_atomic`] of `text` in UTF-8."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def json_text(data: Any) -> str:
    """`data` as the JSON this package writes: indented by 2, non-ASCII kept as is, ending in a newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """[`write_atomic`] of `data` as JSON (see [`json_text`]). Serialized inside the write: data JSON cannot hold (a
    set, say) raises with the earlier file untouched."""
    return write_atomic(path, lambda handle: handle.write(json_text(data).encode("utf-8")))


def write_all_or_nothing(payloads: Sequence[tuple[Path, bytes]], folders: Sequence[Path]) -> list[Path]:
    """Writes every `(path, bytes)` with [`write_bytes_atomic`]; if one write fails, removes the files already
    written and the `folders` this call created, then re-raises."""
    created = [folder for folder in folders if not folder.exists()]
    written: list[Path] = []
    try:
        for path, data in payloads:
            written.append(write_bytes_atomic(path, data))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return written
