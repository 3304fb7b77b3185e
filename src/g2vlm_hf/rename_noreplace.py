"""Move a folder to a name only if nothing is there: the last step of a swap can never replace what appeared late.

On Linux this is one system call, `renameat2(..., RENAME_NOREPLACE)` (through ctypes), which fails with `EEXIST`
whatever lies at the target. Where it is missing (another libc, a file system without it) the name is first reserved
with `mkdir` (which fails if anything is there) and the folder is renamed onto that empty folder: POSIX `rename`
replaces an empty folder only, so a file put into the reserved name meanwhile makes it fail (`ENOTEMPTY`). On Windows
`os.rename` never replaces an existing target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from pathlib import Path

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2(source: Path, target: Path) -> bool:
    """True when renameat2 moved `source`; False when this system lacks it; OSError on any other failure."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_noreplace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename the folder `source` to `target`; `FileExistsError` (or another OSError) if anything is at `target`."""
    source, target = Path(source), Path(target)
    if sys.platform.startswith("linux") and _renameat2(source, target):
        return
    if sys.platform == "win32":
        os.rename(source, target)
        return
    os.mkdir(target)  # reserves the name; FileExistsError if anything is there
    try:
        os.rename(source, target)  # onto the empty folder only
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        raise


__all__ = ["rename_noreplace"]
