"""Output folders that never lose data: the command owns, file by file, what it replaces.

Used by `g2vlm-convert` and `g2vlm reconstruct` (its `--output` and `--colmap` folders).

Ownership. A folder this package writes holds a manifest (`output_manifest.MANIFEST_NAME`): the kind of output
(reconstruction, colmap, converted-model, ...), the command, and every file with its size and sha256. An existing
non-empty folder is replaced only with `overwrite` and only when its manifest is of the same kind and every entry in
it is still exactly the manifest's; a user's file, another tool's folder, a modified file, a link or an output of
another kind makes the run stop and name those paths: nothing is recognised by its file name, nothing foreign is ever
deleted.

Staging and swap. A run writes into a hidden staging folder beside the target (`.NAME.g2vlm-staging.XXXXXXXX`,
marked by a staging manifest naming its writer). When it is complete, its manifest is sealed and, under the lock:
the target is checked again; a previous output is renamed aside (`.NAME.g2vlm-old.XXXXXXXX`) and checked once more
there (a file added between the check and the rename is found now, and the folder is put back); the staging folder
then takes the target's name with a rename that refuses any existing target (`rename_noreplace`), so a folder that
appeared at the target during the run is never replaced; finally the old folder is emptied of the files its manifest
lists, and removed only if nothing else is left in it.
An output withdrawn during the run (`StagingFolders.withdraw`) is not swapped: its staging folder is removed and
its target is not touched.

Locks. `output_lock` holds an exclusive advisory lock on `.NAME.g2vlm-lock` beside the target (its pid, host and
command written in it) from the checks to the swap, and a shared lock on the lock file of every ancestor folder that
has one: a run writing `out/nest` (exclusive on `out/.nest.g2vlm-lock`) and one writing `out/nest/inner` (shared on
the same file) exclude each other, while runs writing beside each other (`out/a`, `out/b`) do not. If the outer run
takes its lock only after the inner one looked, the inner run's lock file and staging folder lie inside the outer
target, where the outer run's checks find them as foreign entries; and the inner output itself, if swapped in first,
is foreign to the outer manifest. The operating system releases the locks of a killed process.

Leftovers of killed runs (staging and old folders) are matched by exact name (`.NAME` + infix + the 8-character
suffix `tempfile` makes; no glob) and touched only when they carry our manifest: a staging folder whose writer is gone
is removed (a sealed one, killed between its seal and its swap, by the next run holding the output's lock), an old
folder is put back when the target is missing and otherwise emptied of its own files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from transformers.utils import logging

from .export.atomic import current_umask
from .output_manifest import (
    MANIFEST_NAME,
    foreign_entries,
    read_manifest,
    remove_owned,
    seal,
    write_staging_manifest,
    writer_record,
)
from .rename_noreplace import rename_noreplace

logger = logging.get_logger(__name__)

MARKER = MANIFEST_NAME
STAGING_INFIX = ".g2vlm-staging."
OLD_INFIX = ".g2vlm-old."
LOCK_SUFFIX = ".g2vlm-lock"
_TEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp appends
_SHOWN = 8  # foreign paths named in an error
_LOCKS_HELD_HERE: set[Path] = set()  # the lock files `output_lock` holds in this process


class OutputError(ValueError):
    """An output path that cannot be used without risking data loss."""


def _is_within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output_dir(
    output: str | os.PathLike[str],
    *,
    kind: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Validate `output` (a folder of `kind`) before any work; return it resolved.

    Refused: the current folder (or one of its ancestors), an ancestor of an input or an input itself, a path that
    is a file or lies under a file, a location this process cannot write to, a name too long for the file system, and
    an existing non-empty folder unless `overwrite` is set and it is an unchanged earlier output of the same `kind`
    (see `replace_problem`).
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
    problem = replace_problem(resolved, kind, overwrite, shown=output)
    if problem:
        raise OutputError(problem)
    return resolved


def replace_problem(target: Path, kind: str, overwrite: bool, *, shown: str | os.PathLike[str] | None = None) -> str:
    """Why the folder at `target` may not be replaced by an output of `kind` ("" when it may: absent, empty, or with
    `overwrite` an unchanged earlier output of the same kind; never a mount point)."""
    shown = target if shown is None else shown
    if not os.path.lexists(target):
        return ""
    if target.is_symlink() or not target.is_dir():
        return f"Output {shown} is a file or a link, not a folder; give a folder path."
    if os.path.ismount(target):  # a run renames its output aside and its new folder in: a mount point cannot move
        return (
            f"Output {shown} is a mount point (a drive, or a folder mounted into a container), which a run cannot "
            f"replace as a whole; give a new folder inside it, e.g. {Path(shown) / 'scene'}."
        )
    if not any(target.iterdir()):
        return ""
    if not overwrite:
        return f"Output {shown} exists and is not empty; pass --overwrite to replace an earlier output of this command."
    manifest = read_manifest(target)
    if manifest is None or manifest.get("state") != "complete":
        return (
            f"Output {shown} exists but is not a previous output of g2vlm (it has no {MANIFEST_NAME} manifest); "
            "--overwrite only replaces those. Choose another folder or remove it yourself."
        )
    if manifest.get("kind") != kind:
        return (
            f"Output {shown} is a previous {manifest.get('kind')} output (`{manifest.get('command')}`), not a {kind} "
            "one; --overwrite only replaces an output of the same kind. Choose another folder."
        )
    foreign = foreign_entries(target, manifest)
    if foreign:
        more = f", ... ({len(foreign) - _SHOWN} more)" if len(foreign) > _SHOWN else ""
        return (
            f"Output {shown} holds {len(foreign)} path(s) the earlier run did not write or that changed since: "
            f"{', '.join(foreign[:_SHOWN])}{more}; --overwrite never deletes them. Move them out or choose another "
            "folder."
        )
    return ""


def _leftovers(output: Path, infix: str) -> list[Path]:
    """The folders beside `output` named exactly `.NAME` + `infix` + a tempfile suffix (no pattern matching)."""
    prefix = f".{output.name}{infix}"
    try:
        names = os.listdir(output.parent)
    except OSError:
        return []
    return [
        output.parent / name
        for name in sorted(names)
        if name.startswith(prefix) and _TEMP_SUFFIX.fullmatch(name[len(prefix) :])
    ]


def clean_leftovers(output: Path) -> list[Path]:
    """Tidy what a killed run left beside `output`; return the folders removed.

    Only folders named for this output that carry our manifest are touched: a staging folder whose writer is gone is
    removed (never one whose writer still runs), and so is a sealed one whose run was killed before its swap when
    this process holds the output's lock (`output_lock`: the swap happens under it, so no other run is between its
    seal and its rename; without the lock such a folder is kept); an old output renamed aside is put back when
    `output` is missing, otherwise emptied of the files its manifest lists. Then a lock file nobody holds is
    removed."""
    output = Path(output)
    removed = []
    for old in _leftovers(output, OLD_INFIX):
        manifest = read_manifest(old)
        if manifest is None or old.is_symlink():
            continue
        if not os.path.lexists(output):  # killed between the two renames of the swap: put it back
            try:
                rename_noreplace(old, output)
                logger.warning(f"Restored {output} from {old}, left behind by an interrupted run.")
            except OSError as error:
                logger.warning(f"Kept {old}, the previous content of {output} ({error}).")
            continue
        left = remove_owned(old, manifest)
        if left:
            logger.warning(f"Kept {old}: it holds {', '.join(left)}, which the interrupted run did not write.")
        else:
            logger.warning(f"Removed {old}, left behind by an interrupted run.")
            removed.append(old)
    for staging in _leftovers(output, STAGING_INFIX):
        manifest = read_manifest(staging)
        if manifest is None or staging.is_symlink():
            continue
        if manifest.get("state") == "complete":  # sealed: only the holder of the output's lock is between seal and swap
            if lock_path(output) not in _LOCKS_HELD_HERE:
                continue
        elif manifest.get("target") != output.name:
            continue
        elif _writer_is_alive(manifest.get("writer")):
            logger.warning(f"Kept {staging}: the process that writes it is still running.")
            continue
        shutil.rmtree(staging, ignore_errors=True)
        logger.warning(f"Removed {staging}, left behind by an interrupted run.")
        removed.append(staging)
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
    """A new staging folder beside `output`, marked with its writer (after cleaning earlier leftovers)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}{STAGING_INFIX}", dir=output.parent))
    staging.chmod(0o777 & ~current_umask())
    write_staging_manifest(staging, output.name)
    return staging


def swap_in_all(pairs: Sequence[tuple[Path, Path]], *, kinds: Sequence[str], overwrite: bool = False) -> list[Path]:
    """Seal each complete staging folder (its manifest) and move it to its output, all as one step.

    Every target is checked first (`replace_problem`); a previous output is renamed aside and checked again there,
    the staging folder is renamed to the target only if nothing is there (`rename_noreplace`), and the old folder is
    emptied of its own files at the end. If one step fails, the outputs already replaced get their previous content
    back and the error is raised. The caller holds the outputs' locks (`staged_outputs`)."""
    pairs = [(Path(staging), Path(output)) for staging, output in pairs]
    if len(kinds) != len(pairs):
        raise ValueError(f"{len(pairs)} outputs but {len(kinds)} kinds.")
    for (staging, _), kind in zip(pairs, kinds):
        if not staging.is_dir():
            raise FileNotFoundError(f"Staging folder {staging} does not exist.")
        seal(staging, kind)
    for (_, output), kind in zip(pairs, kinds):
        problem = replace_problem(output, kind, overwrite)
        if problem:
            raise OutputError(problem)
    done: list[tuple[Path, Path, Path | None, dict | None]] = []  # (staging, output, old, old's manifest)
    try:
        for (staging, output), kind in zip(pairs, kinds):
            old, manifest = _move_previous_aside(output, kind, overwrite)
            try:
                rename_noreplace(staging, output)
            except OSError as error:
                if old is not None:
                    _put_back(old, output)
                if isinstance(error, FileExistsError) or error.errno == errno.ENOTEMPTY:
                    raise OutputError(
                        f"Output {output} appeared while this run was writing; it was left as it is and nothing was "
                        "written. Run again (with --overwrite if it is an earlier output) or choose another folder."
                    ) from error
                raise
            done.append((staging, output, old, manifest))
    except BaseException:
        for staging, output, old, _ in reversed(done):
            os.rename(output, staging)
            if old is not None:
                _put_back(old, output)
        raise
    for _, _, old, manifest in done:
        if old is not None:
            left = remove_owned(old, manifest)
            if left:
                logger.warning(f"Kept {old}: {', '.join(left)} appeared in the previous output during the swap.")
    return [output for _, output, _, _ in done]


def _move_previous_aside(output: Path, kind: str, overwrite: bool) -> tuple[Path | None, dict | None]:
    """Make room at `output`: remove an empty folder, or rename an earlier output aside and check it there."""
    if not os.path.lexists(output):
        return None, None
    if output.is_dir() and not output.is_symlink():
        try:
            output.rmdir()  # only if empty: a file put there meanwhile makes it fail
            return None, None
        except OSError:
            pass
    problem = replace_problem(output, kind, overwrite)
    if problem:
        raise OutputError(problem)
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}{OLD_INFIX}", dir=output.parent))
    try:
        os.rename(output, old)  # onto the empty folder just made: fails if anything was put in it
    except OSError:
        old.rmdir()
        raise
    problem = replace_problem(old, kind, overwrite, shown=output)  # what was added up to the rename is seen now
    if problem:
        _put_back(old, output)
        raise OutputError(problem)
    manifest = read_manifest(old)
    if manifest is None:  # emptied, manifest and all, between the check and the rename: nothing of it to keep
        try:
            old.rmdir()
        except OSError:  # and something put in it since: not ours to judge
            _put_back(old, output)
            raise OutputError(f"Output {output} changed while this run replaced it; nothing was written.") from None
        return None, None
    return old, manifest


def _put_back(old: Path, output: Path) -> None:
    """Return a previous output renamed aside to its place, unless something took the place meanwhile."""
    try:
        rename_noreplace(old, output)
    except OSError:
        logger.warning(f"The previous content of {output} is kept in {old}: something else is now at {output}.")


class StagingFolders(list):
    """The staging folders `staged_outputs` yields, one per output in order; an output can be withdrawn."""

    def __init__(self, folders: Iterable[Path]):
        super().__init__(folders)
        self.withdrawn: set[int] = set()

    def withdraw(self, index: int) -> None:
        """Do not swap in output `index` when the block ends: its staging folder is discarded with what was written
        in it, and its target is left exactly as it is (absent, or an earlier output untouched)."""
        if not 0 <= index < len(self):
            raise IndexError(f"No output {index}: there are {len(self)}.")
        self.withdrawn.add(index)


@contextlib.contextmanager
def staged_outputs(
    outputs: Sequence[str | os.PathLike[str]], *, kinds: Sequence[str], overwrite: bool = False
) -> Iterator[StagingFolders]:
    """One transaction over several output folders: lock each, tidy the leftovers of killed runs beside it (a
    previous output a killed swap left aside is put back), check each again under the lock, yield a staging
    folder per output, and seal and swap them all in (`swap_in_all`) when the block ends without an error, except
    those withdrawn in the block (`StagingFolders.withdraw`). The staging folders are always removed and the locks
    released, so a failure or Ctrl-C leaves every previous output as it was, and so does a withdrawal its own.

    An output is the folder its path leads to, as `check_output_dir` checks it: `~` expanded, links followed (a link
    to an earlier output has that folder replaced and still points to it)."""
    shown = [Path(output) for output in outputs]  # as the caller wrote them, for messages
    outputs = [output.expanduser().resolve() for output in shown]
    if len(kinds) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(kinds)} kinds.")
    with contextlib.ExitStack() as stack:
        for output in outputs:
            stack.enter_context(output_lock(output))
        for output in outputs:  # a previous output a killed swap left aside is put back before it is checked
            clean_leftovers(output)
        for output, kind, name in zip(outputs, kinds, shown):  # again, now that no other writer of ours can change it
            problem = replace_problem(output, kind, overwrite, shown=name)
            if problem:
                raise OutputError(problem)
        stagings: list[Path] = []
        stack.callback(_remove_folders, stagings)  # after a swap they are gone; after a failure, the new content
        for output in outputs:
            stagings.append(make_staging_dir(output))
        staged = StagingFolders(stagings)
        yield staged
        kept = [index for index in range(len(outputs)) if index not in staged.withdrawn]
        swap_in_all(
            [(stagings[index], outputs[index]) for index in kept],
            kinds=[kinds[index] for index in kept],
            overwrite=overwrite,
        )


def _remove_folders(folders: list[Path]) -> None:
    for folder in folders:
        if read_manifest(folder) is not None:  # a staging folder of this run (gone after its swap)
            shutil.rmtree(folder, ignore_errors=True)


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of `output`: `.NAME.g2vlm-lock` beside it."""
    output = Path(output)
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the writer's lock of `output` (creating its parent folders, removed again if they end empty), and a shared
    lock on the lock file of each ancestor folder that has one, until the block ends.

    Raises:
        OutputError: another live process writes `output` or a folder around it (its pid, host and command are
            named), or the lock file cannot be written.
    """
    resolved = Path(output).expanduser().resolve()
    path = lock_path(resolved)
    created = [folder for folder in resolved.parents if not folder.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path)
    except OSError as error:
        _remove_empty(created)
        raise OutputError(f"Output {output}: cannot create its lock file {path} ({error}).") from error
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_empty, created)  # last: a run that wrote nothing leaves no new empty folders
        stack.callback(handle.close)
        stack.callback(path.unlink, missing_ok=True)  # while still locked: no writer holds a lock on a removed file
        _LOCKS_HELD_HERE.add(path)
        stack.callback(_LOCKS_HELD_HERE.discard, path)
        for ancestor in resolved.parents:
            if ancestor.name:
                shared = _share(lock_path(ancestor), resolved)
                if shared is not None:
                    stack.callback(shared.close)
        yield path


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: those this run created around its output, when the
    output did not come to be (a folder holding anything, such as another writer's lock file, stays)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _share(path: Path, output: Path):
    """A shared lock on the lock file `path` of a folder around `output`, if it exists (None otherwise)."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115  (closed by output_lock)
    except OSError:
        return None
    if _try_lock(handle, shared=True):
        return handle
    content = handle.read()
    handle.close()
    raise OutputError(f"Output {output}: {_held_message(path, content)}")


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
            handle.write(json.dumps(writer_record()) + "\n")
            handle.flush()
            return handle
        except BaseException:
            handle.close()
            raise


def _try_lock(handle, *, shared: bool = False) -> bool:
    """Take an exclusive (or shared), non-blocking lock on the open file; False when another process holds one that
    conflicts. Windows has no shared locks: there a shared lock is an exclusive one."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _held_message(path: Path, content: str) -> str:
    try:
        writer = json.loads(content)
        who = f"process {writer['pid']} on {writer['host']} (`{writer['command']}`, started {writer['since']})"
    except (ValueError, KeyError, TypeError):
        who = "another process (writing it or an output inside it)"
    output = path.parent / path.name[1 : -len(LOCK_SUFFIX)]
    return (
        f"Output {output} is being written by {who}, which holds {path}; wait for it to finish, or choose another "
        "output."
    )


def _writer_is_alive(writer: object) -> bool:
    """Whether the process recorded in a staging manifest may still run (a writer on another host is assumed alive)."""
    try:
        pid, host = int(writer["pid"]), writer["host"]  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return False  # no writer recorded: a leftover
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
    "StagingFolders",
    "check_output_dir",
    "clean_leftovers",
    "lock_path",
    "make_staging_dir",
    "output_lock",
    "replace_problem",
    "staged_outputs",
    "swap_in_all",
]
