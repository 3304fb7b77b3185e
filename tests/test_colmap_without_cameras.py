"""Issue 30, point 5: `g2vlm reconstruct --colmap` when no view gets a usable pinhole camera (as with random weights).
The scene at --output is still written, the COLMAP target is left exactly as it was, one line on stderr says why, and
the exit status is 2; on the one-pass path and on the chunked (streaming) one."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli_chunked import KnownGeometry, walk_poses, write_grey_views
from transformers import AutoProcessor

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.safe_output import staged_outputs

pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")

VIEWS = 8
PATHS = {"one pass": [], "chunked": ["--chunk-size", "6", "--overlap", "2"]}
SCENE_FILES = ["cameras.json", "points.ply", "scene.glb", "depth/view_007.png"]


class NoPinholeGeometry(KnownGeometry):
    """The known geometry, but with the intrinsics a fit gives for point maps that are no pinhole camera's: a
    negative focal length on some views, not finite on the others."""

    def reconstruct(self, geometry_pixel_values, **kwargs):
        output = super().reconstruct(geometry_pixel_values, **kwargs)
        intrinsics = output.intrinsics.clone()
        intrinsics[:, ::2, 0, 0] = -intrinsics[:, ::2, 0, 0]
        intrinsics[:, 1::2, 1, 1] = float("nan")
        output.intrinsics = intrinsics
        return output


@pytest.fixture
def views(tmp_path) -> Path:
    folder = tmp_path / "views"
    write_grey_views(folder, range(VIEWS))
    return folder


def use_stand_in(monkeypatch, model_dir: Path, usable: bool) -> None:
    processor = AutoProcessor.from_pretrained(model_dir)
    stand_in = (KnownGeometry if usable else NoPinholeGeometry)(processor, walk_poses(VIEWS))
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: stand_in)


def reconstruct(model_dir: Path, views: Path, output: Path, colmap: Path, path: str, *extra: str) -> int:
    return g2vlm(["reconstruct", "--model", str(model_dir), "--folder", str(views), "--output", str(output),
                  "--colmap", str(colmap), "--device", "cpu", *PATHS[path], *extra])  # fmt: skip


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def check_reported(capsys, output: Path, colmap: Path) -> list[Path]:
    """The one error line (naming --colmap, the reason and what to do), and the printed paths, all existing."""
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert "Traceback" not in captured.err and len(errors) == 1, captured.err
    assert errors[0].startswith(f"g2vlm: error: no COLMAP model was written to {colmap}")
    assert "usable pinhole camera" in errors[0] and "real weights" in errors[0] and str(output) in errors[0]
    printed = [Path(line.strip()) for line in captured.out.splitlines() if line.startswith("  ")]
    assert printed and all(path.is_file() for path in printed), printed
    assert not any(path.is_relative_to(colmap) for path in printed)
    return printed


@pytest.mark.parametrize("path", PATHS)
def test_the_scene_is_written_and_no_colmap_folder_is_made(
    small_views_model, views, tmp_path, monkeypatch, capsys, path
):
    output, colmap = tmp_path / "scene", tmp_path / "sparse"
    use_stand_in(monkeypatch, small_views_model, usable=False)
    assert reconstruct(small_views_model, views, output, colmap, path) == 2
    printed = check_reported(capsys, output, colmap)
    assert all((output / name).is_file() for name in SCENE_FILES)
    assert {output / name for name in SCENE_FILES} <= set(printed)
    assert not colmap.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene", "views"]  # no staging folder or lock left


@pytest.mark.parametrize("path", PATHS)
def test_an_earlier_colmap_output_is_left_as_it_was(small_views_model, views, tmp_path, monkeypatch, capsys, path):
    output, colmap = tmp_path / "scene", tmp_path / "sparse"
    use_stand_in(monkeypatch, small_views_model, usable=True)
    assert reconstruct(small_views_model, views, output, colmap, path) == 0
    assert (colmap / "cameras.txt").is_file()
    cameras_before, colmap_before = (output / "cameras.json").read_bytes(), snapshot(colmap)
    capsys.readouterr()

    use_stand_in(monkeypatch, small_views_model, usable=False)
    assert reconstruct(small_views_model, views, output, colmap, path, "--overwrite") == 2
    check_reported(capsys, output, colmap)
    assert snapshot(colmap) == colmap_before  # the earlier owned COLMAP model, untouched
    assert (output / "cameras.json").read_bytes() != cameras_before  # the new scene was swapped in
    assert all((output / name).is_file() for name in SCENE_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene", "sparse", "views"]


@pytest.mark.parametrize("path", PATHS)
def test_colmap_inside_the_output_is_not_made(small_views_model, views, tmp_path, monkeypatch, capsys, path):
    output = tmp_path / "scene"
    use_stand_in(monkeypatch, small_views_model, usable=False)
    assert reconstruct(small_views_model, views, output, output / "sparse", path) == 2
    check_reported(capsys, output, output / "sparse")
    assert all((output / name).is_file() for name in SCENE_FILES)
    assert not (output / "sparse").exists()


def test_a_withdrawn_output_is_not_swapped_and_its_staging_is_removed(tmp_path):
    """`staged_outputs`: a withdrawn target keeps its earlier output byte for byte; the other one is swapped in."""
    first, second = tmp_path / "a", tmp_path / "b"
    with staged_outputs([first, second], kinds=["reconstruction", "colmap"]) as stagings:
        (stagings[0] / "x.txt").write_text("first run")
        (stagings[1] / "y.txt").write_text("first run")
    before = snapshot(second)
    with staged_outputs([first, second], kinds=["reconstruction", "colmap"], overwrite=True) as stagings:
        (stagings[0] / "x.txt").write_text("second run")
        (stagings[1] / "y.txt").write_text("second run")
        stagings.withdraw(1)
        with pytest.raises(IndexError):
            stagings.withdraw(2)
    assert (first / "x.txt").read_text() == "second run"
    assert snapshot(second) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    with staged_outputs([tmp_path / "c"], kinds=["colmap"]) as stagings:
        stagings.withdraw(0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing made for a target never swapped in
