"""Issue 30: an output folder is replaced only when the command owns every file in it (its manifest), and never by
a run of another kind: the six data-loss cases of the issue, one test each, through the real command lines (model work
stood in, see ownership_world.py). Only the public command lines are used, so these tests also run against older
versions of the package (to show which cases they lost data in)."""

from __future__ import annotations

import json

import pytest
from ownership_world import CASES, CONVERT_INPUT, Run, UserAdd, UserTree, play

needs_checkpoint = pytest.mark.skipif(
    not CONVERT_INPUT.is_dir(), reason="needs the official tiny fixture (set G2VLM_FIXTURES)"
)

# ---------------------------------------------------------------------------------------- the six cases of the issue


@pytest.mark.parametrize("case", sorted(CASES))
def test_data_loss_case(case, tmp_path, monkeypatch, capsys):
    world = play(tmp_path, CASES[case], monkeypatch)  # checks the invariant after every step
    refused = {"3-nested-concurrent-runs": ("out/nest/inner", "being written")}.get(case)
    if refused is None:  # the last run is refused with a one-line reason
        refused = (
            CASES[case][-1].target,
            {"2": "not empty", "5": "only replaces an output of the same kind"}.get(case[0], "overwrite"),
        )
    assert (refused[0], 2) in world.codes
    assert refused[1] in capsys.readouterr().err


@needs_checkpoint
@pytest.mark.parametrize(
    "steps",
    [
        [UserTree("fine-tuned-save", "out"), Run("convert", "out", overwrite=True)],  # model_type g2vlm is not ours
        [Run("reconstruct", "out"), Run("convert", "out", overwrite=True)],  # case 5 through g2vlm-convert
        [Run("convert", "out"), UserAdd("out"), Run("convert", "out", overwrite=True)],
        [UserTree("fine-tuned-save", "out"), Run("convert-reconstruction-only", "out", overwrite=True)],
        [Run("convert", "out"), UserAdd("out"), Run("convert-reconstruction-only", "out", overwrite=True)],
    ],
    ids=[
        "fine-tuned-save",
        "reconstruction-to-model",
        "user-file-in-model",
        "fine-tuned-save-recon",
        "user-file-recon",
    ],
)
def test_convert_overwrite_needs_its_own_unchanged_output(steps, tmp_path, monkeypatch):
    world = play(tmp_path, steps, monkeypatch)
    assert world.codes[-1] == ("out", 2)  # refused


@needs_checkpoint
def test_either_conversion_replaces_the_other(tmp_path, monkeypatch):
    """Full and reconstruction-only conversions are outputs of one kind: each may replace the other with
    --overwrite, and the folder then holds only the new one."""
    world = play(
        tmp_path,
        [
            Run("convert", "out"),
            Run("convert-reconstruction-only", "out", overwrite=True),
            Run("convert", "out", overwrite=True),
        ],
        monkeypatch,
    )
    assert [code for _, code in world.codes] == [0, 0, 0]
    written = {path.relative_to(tmp_path / "out").as_posix() for path in (tmp_path / "out").rglob("*")}
    manifest = json.loads((tmp_path / "out" / ".g2vlm-output").read_text())
    assert written == set(manifest["files"]) | {".g2vlm-output"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "g2vlm"
