"""The record an output folder keeps of what the command wrote there: its manifest.

Every folder `safe_output` swaps into place holds `MANIFEST_NAME`, a JSON document naming the tool, the kind of
output (`KINDS`), the command that wrote it and every file with its size and sha256. It is what makes a folder "ours":
`--overwrite` replaces a folder only when its manifest is of the same kind and every file in it is still exactly the
manifest's (`foreign_entries`); nothing is recognised by file names. While a run stages its output, the staging
folder holds a manifest without files but with its writer (pid, host) and target name, so that the next run can tell
a leftover of a killed run from a staging folder still in use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from .export.atomic import file_mode, json_text, write_text_atomic

MANIFEST_NAME = ".g2vlm-output"
TOOL = "g2vlm-hf"
FORMAT = 1
KINDS = ("reconstruction", "colmap", "converted-model")
"""The kinds of output folders: `g2vlm reconstruct --output`, its `--colmap DIR`, `g2vlm-convert OUTPUT`."""
COMMAND_SHOWN_CHARS = 160
_CHUNK = 1 << 20


def command_line() -> str:
    """This process's command line, shortened, with the value of a `--token` hidden (manifests are readable)."""
    words = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"]
    for word in sys.argv[1:]:
        if word.startswith("--token="):
            word = "--token=***"
        elif words[-1] == "--token":
            word = "***"
        words.append(word)
    command = " ".join(words)
    return command if len(command) <= COMMAND_SHOWN_CHARS else command[: COMMAND_SHOWN_CHARS - 3] + "..."


def writer_record() -> dict:
    """Who is writing: recorded in lock files and staging manifests."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command_line(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


_HASHED: dict[tuple[int, ...], str] = {}
RECENT_CHANGE_NS = 2_000_000_000
"""A file changed less than this long before it is read is hashed again at every check. File times come from a
coarse clock (a few ms on Linux before 6.13, 1 s on ext3, 2 s on FAT), so a same-size write just after our read can
leave them unchanged; any write after a change time older than this is sure to show in the key (git's "racy clean")."""


def sha256_of(path: Path) -> str:
    """The file's sha256. Remembered for this process under its identity and change times: a run checks an earlier
    output several times (before model work, under the lock, at the swap) and a converted model weighs gigabytes; any
    write to the file changes its ctime, which no user call can set back. Files changed within `RECENT_CHANGE_NS` of
    the read are not remembered (see there)."""
    read_at = time.time_ns()
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if key in _HASHED:
            return _HASHED[key]
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if info.st_ctime_ns < read_at - RECENT_CHANGE_NS:  # a write from now on, even during the read, changes the key
        _HASHED[key] = digest.hexdigest()
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    """The manifest of `folder`, or None when it has none this package wrote (absent, not JSON, another tool's)."""
    path = Path(folder) / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def write_staging_manifest(staging: Path, target_name: str) -> None:
    """Mark a new staging folder as ours: its writer and the name of the output it stages."""
    record = {"tool": TOOL, "format": FORMAT, "state": "staging", "target": target_name, "writer": writer_record()}
    write_text_atomic(staging / MANIFEST_NAME, json_text({**record, "files": {}}))


def seal(staging: Path, kind: str) -> dict:
    """Write the final manifest of a complete staging folder: its kind, the command and every file's size/sha256.
    Every file gets the mode an ordinary new file gets under the umask (0644 under 022), whichever library wrote it
    (safetensors' writers make 0600 files)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown output kind {kind!r}; one of {KINDS}.")
    files = {}
    for path in sorted(_walk(staging)):
        relative = path.relative_to(staging).as_posix()
        if relative != MANIFEST_NAME and path.is_file() and not path.is_symlink():
            os.chmod(path, file_mode())
            files[relative] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    manifest = {
        "tool": TOOL,
        "format": FORMAT,
        "state": "complete",
        "kind": kind,
        "command": command_line(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "files": files,
    }
    write_text_atomic(staging / MANIFEST_NAME, json_text(manifest))
    return manifest


def _walk(folder: Path) -> list[Path]:
    """Every entry under `folder` (files, folders, links), without following links."""
    entries = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        entries += [Path(root) / name for name in [*dirs, *files]]
    return entries


def foreign_entries(folder: Path, manifest: dict) -> list[str]:
    """The paths in `folder` (relative, sorted) that the manifest does not account for: files it does not list, files
    whose size or sha256 changed, links, and folders holding none of its files. Missing files are not foreign."""
    files = manifest["files"]
    needed_dirs = {parent.as_posix() for name in files for parent in Path(name).parents if parent != Path(".")}
    foreign = []
    for path in _walk(folder):
        relative = path.relative_to(folder).as_posix()
        if relative == MANIFEST_NAME:
            continue
        if path.is_symlink():
            foreign.append(relative)
        elif path.is_dir():
            if relative not in needed_dirs:
                foreign.append(relative + "/")
        elif relative not in files or not _unchanged(path, files[relative]):
            foreign.append(relative)
    return sorted(foreign)


def _unchanged(path: Path, entry: dict) -> bool:
    try:
        return path.is_file() and path.stat().st_size == entry["size"] and sha256_of(path) == entry["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def _directly_in(folder: Path, name: str) -> bool:
    """Whether `folder / name` lies in `folder` itself: a relative path without `..` whose folders are real folders,
    not links (a file reached through a link is someone else's, whatever its bytes)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return False
    path = folder
    for part in relative.parts[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return False
    return True


def remove_owned(folder: Path, manifest: dict) -> list[str]:
    """Delete what the manifest lists in `folder` (files still exactly as listed, then the folders they emptied, then
    the manifest and `folder` itself when empty); return what was left because it is not ours."""
    for name, entry in manifest["files"].items():
        path = folder / name
        if _directly_in(folder, name) and not path.is_symlink() and _unchanged(path, entry):
            with contextlib.suppress(OSError):
                path.unlink()
    dirs = sorted({parent for name in manifest["files"] for parent in Path(name).parents}, reverse=True)
    for directory in dirs:
        if directory != Path(".") and _directly_in(folder, directory.as_posix()):
            with contextlib.suppress(OSError):
                (folder / directory).rmdir()
    remaining = [entry for entry in os.listdir(folder) if entry != MANIFEST_NAME]
    if not remaining:
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        folder.rmdir()
    return sorted(remaining)


__all__ = [
    "KINDS",
    "MANIFEST_NAME",
    "command_line",
    "foreign_entries",
    "read_manifest",
    "remove_owned",
    "seal",
    "write_staging_manifest",
    "writer_record",
]
