"""A small world of user files and g2vlm outputs, and the invariant the output layer keeps (issue 30).

Steps are run through the real command lines (`g2vlm_hf.cli.main reconstruct`, `g2vlm_hf.conversion.cli.main`) and
the real output layer; only the model work is a stand-in (the reconstruct writers write a few random files, the
converter's load-and-run check is skipped). After every step:

- every file the package did not write (user trees, files added or edited by the user) is byte-identical;
- every file a successful run printed (or, for the converter, wrote) still exists with its bytes, unless a later
  successful run of the SAME kind replaced that output as a whole;
- a successful run never replaced an earlier output of another kind.

A step may interfere while a run writes (`during`): a folder appears at its output, the user adds a file into it, or a
second run with a nested output runs to its end (the lock must keep them apart). A run may be killed in its writer
(`kill_at`: an exception after that many files), or its process may die by SIGKILL at a point of its output work
(`hard_kill`, one of `HARD_KILL_POINTS`: the run is forked and nothing of its own clean-up runs). After a hard kill
the tidy-up the next run does first (`clean_leftovers` under the output's lock) runs, and then also:

- nothing of the killed run is left beside its outputs (staging or old folders, lock files) unless it holds a user's
  file;
- each output of the killed run holds either its earlier content or, swapped in before the kill, a complete output of
  the same kind (every file its manifest lists, unchanged).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import tempfile
from dataclasses import dataclass, replace
from glob import escape as glob_escape
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FIXTURE_DIR
from PIL import Image

from g2vlm_hf import safe_output
from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.conversion.cli import main as g2vlm_convert
from g2vlm_hf.output_manifest import MANIFEST_NAME, foreign_entries, read_manifest

USER_TREES: dict[str, dict[str, bytes]] = {
    "gaussian-splatting": {
        "cameras.json": b'[{"id": 0}]',
        "cfg_args": b"Namespace(sh_degree=3)",
        "point_cloud/iteration_7000/point_cloud.ply": b"ply\nformat binary_little_endian 1.0\n",
    },
    "colmap-project": {
        "cameras.txt": b"# my calibration",
        "images.txt": b"# my images",
        "points3D.txt": b"# my points",
        "images/IMG_0001.jpg": b"\xff\xd8 my photo",
        "database.db": b"SQLite format 3\x00",
    },
    "fine-tuned-save": {
        "config.json": b'{"model_type": "g2vlm", "architectures": ["G2VLMForConditionalGeneration"]}',
        "model.safetensors": b"my fine-tuned weights",
    },
    "notes": {"notes.txt": b"my notes", "meshing/mesh.obj": b"v 0 0 0"},
    "old-marker-output": {".g2vlm-output": b"Written by g2vlm-hf.\n", "cameras.json": b"{}", "mine.txt": b"mine"},
}
PLACES = ("out", "out/nest", "out/nest/inner", "scene[1]", "scene1", "sparse", ".scene1.g2vlm-old.abcdefgh")
TARGETS = ("out", "out/nest", "out/nest/inner", "scene[1]", "scene1", "sparse", "out/sparse")
CONVERT_INPUT = FIXTURE_DIR / "checkpoint"
HARD_KILL_POINTS = ("writer", "seal", "aside", "swap", "emptying")
"""Where a hard-killed run dies: after its writer's first file; after sealing its first output; after renaming its
first previous output aside; after swapping in its first output; after removing one file of a previous output."""
KILLED = -9


class _Inputs(dict):
    def to(self, device):
        return self


class _Processor:
    geometry_image_processor = SimpleNamespace(max_views=256)

    def __call__(self, **kwargs):
        return _Inputs(geometry_pixel_values=None)


class _Model:
    device = "cpu"

    def reconstruct(self, **kwargs):
        return SimpleNamespace(camera_poses=torch.zeros(1, 2, 4, 4))


class Killed(Exception):
    """The stand-in of a crash inside the writer."""


def _die() -> None:
    """SIGKILL this process: no finally, no exit handler, no clean-up of any kind runs."""
    os.kill(os.getpid(), signal.SIGKILL)


def _manifest_bytes(output: Path) -> bytes | None:
    path = output / MANIFEST_NAME
    return path.read_bytes() if path.is_file() else None


def _then_die(function):
    """`function`, after which the process dies."""

    def wrapper(*args, **kwargs):
        function(*args, **kwargs)
        _die()

    return wrapper


@dataclass(frozen=True)
class Run:
    command: str  # "reconstruct", "convert" or "convert-reconstruction-only" (g2vlm-convert --reconstruction-only)
    target: str
    overwrite: bool = False
    colmap: str | None = None
    kill_at: int | None = None
    during: object = None  # a UserTree, UserAdd or Run done while this run writes
    hard_kill: str | None = None  # one of HARD_KILL_POINTS (not with `during`)


@dataclass(frozen=True)
class UserTree:
    tree: str
    place: str  # None while `during` a run: the run's output


@dataclass(frozen=True)
class UserAdd:
    place: str | None  # None while `during` a run: into the run's output
    name: str = "added-by-user.txt"


@dataclass(frozen=True)
class UserEdit:
    which: int  # index into the files of the live outputs


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


class World:
    """A folder with user files and outputs, and what each should hold."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.user: dict[Path, bytes] = {}
        self.outputs: dict[Path, tuple[str, dict[Path, bytes]]] = {}  # target -> (kind, files it wrote)
        self.model = root / "model"
        self.model.mkdir()
        self.photos = [root / "photos" / "a.png", root / "photos" / "b.png"]
        for shade, photo in enumerate(self.photos):  # real (small) images: the views are read before the model work
            image = io.BytesIO()
            Image.new("RGB", (28, 28), (40 * shade, 90, 160)).save(image, format="PNG")
            self._write_user(photo, image.getvalue())
        self._written = 0
        self._hook: tuple[object, int | None, Path] | None = None
        self._die_in_writer = False
        self.codes: list[tuple[str, int]] = []  # (target, exit code) of every run, in the order they ended
        self._stand_ins(monkeypatch)

    # --------------------------------------------------------------------------------------------- stand-ins
    def _stand_ins(self, patch: pytest.MonkeyPatch) -> None:
        model, processor = _Model(), _Processor()
        patch.setattr("g2vlm_hf.model_loading.load_processor", lambda *a: processor)
        patch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: model)
        patch.setattr("g2vlm_hf.cli.reconstruct.check_reconstruction", lambda *a, **k: "scene")
        patch.setattr("g2vlm_hf.cli.reconstruct.write_scene", self._write_scene)
        patch.setattr("g2vlm_hf.export.write_colmap", self._write_colmap)
        patch.setattr("g2vlm_hf.conversion.convert_official._check_loads_and_runs", self._converted)

    def _files(self, folder: Path, names: list[str]) -> list[Path]:
        self._interfere()
        written = []
        for name in names:
            self._written += 1
            if self._hook is not None and self._hook[1] is not None and self._written > self._hook[1]:
                raise Killed(f"killed after {self._hook[1]} files")
            path = Path(folder) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(16))
            written.append(path)
            if self._die_in_writer:
                _die()
        return written

    def _write_scene(self, folder, scene, **options):
        return self._files(folder, ["scene.glb", "points.ply", "cameras.json", "depth/view_000.png"])

    def _write_colmap(self, folder, scene, **options):
        return self._files(folder, ["cameras.txt", "images.txt", "points3D.txt"])

    def _converted(self, staging):
        self._files(staging, [])
        if self._hook is not None and self._hook[1] is not None:
            raise Killed("killed in the converter")

    def _interfere(self) -> None:
        if self._hook is None or self._hook[0] is None:
            return
        during, kill_at, target = self._hook
        self._hook = (None, kill_at, target)  # once
        if isinstance(during, UserTree):
            self.user_tree(during.tree, target)
        elif isinstance(during, UserAdd):
            self.user_add(target, during.name)
        elif isinstance(during, Run):
            saved, self._written = (self._hook, self._written), 0
            self._hook = None
            self.run(during)
            self._hook, self._written = saved

    # --------------------------------------------------------------------------------------------- user actions
    def _write_user(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.user[path] = data

    def _blocked(self, folder: Path) -> bool:
        """Whether `folder` cannot hold a new file (it or an ancestor inside the world is a file)."""
        return any(p.is_file() for p in [folder, *folder.parents] if p == self.root or self.root in p.parents)

    def user_tree(self, tree: str, folder: Path) -> None:
        if self._blocked(folder) or (folder.is_dir() and any(folder.iterdir())):
            return
        for name, data in USER_TREES[tree].items():
            self._write_user(folder / name, data)

    def user_add(self, folder: Path, name: str) -> None:
        if not self._blocked(folder) and not (folder / name).exists():
            self._write_user(folder / name, b"added by the user " + str(folder).encode())

    def user_edit(self, which: int) -> None:
        files = sorted(path for _, written in self.outputs.values() for path in written)
        if files:
            path = files[which % len(files)]
            for _, written in self.outputs.values():
                written.pop(path, None)
            self._write_user(path, path.read_bytes() + b" edited by the user")

    # --------------------------------------------------------------------------------------------- runs
    def run(self, step: Run) -> int:
        target = self.root / step.target
        if step.command == "reconstruct":
            argv = ["reconstruct", "--model", str(self.model), "--device", "cpu", *map(str, self.photos)]
            argv += ["--output", str(target)] + (["--overwrite"] if step.overwrite else [])
            colmap = self.root / step.colmap if step.colmap else None
            argv += ["--colmap", str(colmap)] if colmap else []
        else:
            argv = [str(CONVERT_INPUT), str(target)] + (["--overwrite"] if step.overwrite else [])
            argv += ["--reconstruction-only"] if step.command == "convert-reconstruction-only" else []
            colmap = None
        outputs = [target] + ([colmap] if colmap else [])
        if step.hard_kill is None:
            code, printed = self._run_here(step, argv, target)
        else:
            manifests = {output: _manifest_bytes(output) for output in outputs}
            code, printed = self._run_killed(step, argv, target)
        self.codes.append((step.target, code))
        if code == 0:
            self._record(step, target, colmap, printed)
        elif step.hard_kill is not None and code == KILLED:
            self._tidy_up_after_a_hard_kill(step, manifests)
        return code

    def _run_here(self, step: Run, argv: list[str], target: Path) -> tuple[int, list[Path]]:
        """Run the command in this process; (exit code, paths it printed)."""
        self._hook, self._written = (step.during, step.kill_at, target), 0
        try:
            if step.command == "reconstruct":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    code = g2vlm(argv)
                return code, [Path(line.strip()) for line in out.getvalue().splitlines() if line.startswith("  ")]
            return g2vlm_convert(argv), []
        except Killed:
            return KILLED, []
        finally:
            self._hook = None

    def _run_killed(self, step: Run, argv: list[str], target: Path) -> tuple[int, list[Path]]:
        """Run the command in a forked process that SIGKILLs itself at `step.hard_kill`; a run that ends before that
        point (a refusal, or no previous output to rename aside) reports its exit code and printed paths."""
        with tempfile.TemporaryDirectory() as scratch:
            report = Path(scratch) / "report.json"
            pid = os.fork()
            if pid == 0:  # the child: never returns into the test
                try:
                    with pytest.MonkeyPatch.context() as patch:
                        self._die_at(step.hard_kill, patch)
                        code, printed = self._run_here(replace(step, hard_kill=None), argv, target)
                    report.write_text(json.dumps([code, [str(path) for path in printed]]))
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                assert os.WTERMSIG(status) == signal.SIGKILL, f"{step}: the run died of signal {os.WTERMSIG(status)}"
                return KILLED, []
            assert report.is_file(), f"{step}: the forked run ended without a report (status {status})"
            code, printed = json.loads(report.read_text())
            return code, [Path(path) for path in printed]

    def _die_at(self, point: str, patch: pytest.MonkeyPatch) -> None:
        """Make this (forked) process SIGKILL itself at `point` of its output work."""
        if point == "writer":
            self._die_in_writer = True
        elif point == "seal":
            patch.setattr(safe_output, "seal", _then_die(safe_output.seal))
        elif point == "aside":
            patch.setattr(safe_output, "_move_previous_aside", _then_die(safe_output._move_previous_aside))
        elif point == "swap":
            rename = safe_output.rename_noreplace

            def swap_then_die(source, target):
                rename(source, target)
                if safe_output.STAGING_INFIX in Path(source).name:
                    _die()

            patch.setattr(safe_output, "rename_noreplace", swap_then_die)
        elif point == "emptying":
            remove_owned = safe_output.remove_owned

            def remove_one_then_die(folder, manifest):
                first = dict(list(manifest["files"].items())[:1])
                remove_owned(folder, {**manifest, "files": first})
                _die()

            patch.setattr(safe_output, "remove_owned", remove_one_then_die)
        else:
            raise ValueError(f"Unknown kill point {point!r}; one of {HARD_KILL_POINTS}.")

    def _record(self, step: Run, target: Path, colmap: Path | None, printed: list[Path]) -> None:
        """What a successful run wrote becomes a live output (checked by `check` from now on)."""
        if step.command != "reconstruct":
            printed = [p for p in target.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
        for path in printed:
            assert path.is_file(), f"{step}: printed {path}, which does not exist"
        outputs = {target: "reconstruction" if step.command == "reconstruct" else "converted-model"}
        if colmap is not None and target not in colmap.parents:
            outputs[colmap] = "colmap"
        for folder, kind in outputs.items():
            earlier = self.outputs.get(folder)
            assert earlier is None or earlier[0] == kind, (
                f"{step}: replaced the earlier {earlier[0]} output at {folder} by a {kind} output"
            )
            inside = {p: p.read_bytes() for p in printed if folder in p.parents}
            if colmap is not None and folder == target and target not in colmap.parents:
                inside = {p: b for p, b in inside.items() if colmap not in p.parents}
            self.outputs[folder] = (kind, inside)

    def _tidy_up_after_a_hard_kill(self, step: Run, manifests: dict[Path, bytes | None]) -> None:
        """Do what the next run does first (tidy up under each output's lock), then check what the kill left:
        `manifests` holds each output's manifest before the run, to tell an output the run swapped in."""
        for output in manifests:
            with safe_output.output_lock(output):
                safe_output.clean_leftovers(output.resolve())
        for output, before in manifests.items():
            for entry in sorted(output.parent.glob(f".{glob_escape(output.name)}.g2vlm-*")):
                holds_a_user_file = any(entry in path.parents for path in self.user)
                assert holds_a_user_file, f"after {step}: {entry.relative_to(self.root)} is left beside the output"
            if _manifest_bytes(output) in (None, before):
                continue  # not swapped in: `check` finds the earlier content there
            manifest = read_manifest(output)
            earlier = self.outputs.get(output)
            assert manifest is not None, f"after {step}: {output} holds a manifest of another tool"
            assert earlier is None or earlier[0] == manifest["kind"], (
                f"after {step}: the earlier {earlier[0]} output at {output} became a {manifest['kind']} output"
            )
            assert foreign_entries(output, manifest) == [], f"after {step}: {output} is not a complete output"
            files = {output / name: (output / name).read_bytes() for name in manifest["files"]}
            assert all(path.is_file() for path in files), f"after {step}: {output} lacks files of its manifest"
            self.outputs[output] = (manifest["kind"], files)

    def apply(self, step: object) -> None:
        if isinstance(step, Run):
            self.run(step)
        elif isinstance(step, UserTree):
            self.user_tree(step.tree, self.root / step.place)
        elif isinstance(step, UserAdd):
            self.user_add(self.root / step.place, step.name)
        elif isinstance(step, UserEdit):
            self.user_edit(step.which)
        self.check(step)

    def check(self, step: object) -> None:
        """The invariant: user files byte-identical, the live outputs' files all there and unchanged."""
        for path, data in self.user.items():
            assert path.is_file(), f"after {step}: the user's {path.relative_to(self.root)} is gone"
            assert path.read_bytes() == data, f"after {step}: the user's {path.relative_to(self.root)} changed"
        for target, (kind, files) in self.outputs.items():
            for path, data in files.items():
                where = path.relative_to(self.root)
                assert path.is_file(), f"after {step}: {where} of the {kind} output at {target.name} is gone"
                assert path.read_bytes() == data, f"after {step}: {where} changed ({_digest(data)})"


# The six data-loss cases of issue 30 as steps (test_ownership_cases.py; explicit examples of the property test).
CASES = {
    # 1. a Gaussian-splatting folder (cameras.json, point_cloud/, cfg_args) is not a previous output
    "1-cameras-json-is-not-ownership": [
        UserTree("gaussian-splatting", "out"),
        Run("reconstruct", "out", overwrite=True),
    ],
    # 2. a folder that appears at --output while the run writes is neither replaced nor deleted (no --overwrite)
    "2-folder-appearing-during-the-run": [Run("reconstruct", "out", during=UserTree("notes", None))],
    # 3. nested outputs of concurrent runs: B (out/nest/inner) runs while A (out/nest) writes
    "3-nested-concurrent-runs": [Run("reconstruct", "out/nest", during=Run("reconstruct", "out/nest/inner"))],
    # 4. --colmap DIR --overwrite onto an ordinary COLMAP project
    "4-colmap-project": [UserTree("colmap-project", "sparse"), Run("reconstruct", "out", True, colmap="sparse")],
    # 5. an output of one kind is not replaced by another kind (reconstruction -> COLMAP model)
    "5-another-kind": [Run("reconstruct", "out"), Run("reconstruct", "scene1", True, colmap="out")],
    # 6. a file the user added inside an earlier output
    "6-user-file-inside-an-output": [
        Run("reconstruct", "out"),
        UserAdd("out", "notes.txt"),
        UserAdd("out/depth", "mesh.obj"),
        Run("reconstruct", "out", overwrite=True),
    ],
}


def play(root: Path, steps: list, monkeypatch: pytest.MonkeyPatch) -> World:
    world = World(root, monkeypatch)
    for step in steps:
        world.apply(step)
    return world
