"""Which views a question about a long chunked reconstruction is asked on: by coverage of the reconstructed cameras
(repeated places skipped) or evenly over the sequence, printed and written into answer.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_cli_chunked import KnownGeometry, walk_poses, write_grey_views
from transformers import AutoProcessor
from transformers.utils import logging

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.view_selection import choose_views, coverage_indices

pytest.importorskip("trimesh", reason="the export extra (trimesh) is part of the test extras")


def poses_at(places: list[tuple[float, float, float]], yaw: list[float] | None = None) -> np.ndarray:
    poses = np.tile(np.eye(4), (len(places), 1, 1))
    for index, centre in enumerate(places):
        angle = 0.0 if yaw is None else yaw[index]
        poses[index, :3, :3] = [
            [math.cos(angle), 0, math.sin(angle)],
            [0, 1, 0],
            [-math.sin(angle), 0, math.cos(angle)],
        ]
        poses[index, :3, 3] = centre
    return poses


def test_coverage_skips_repeated_places():
    # a camera that stands still for a while at each of three places, then a fourth place once
    places = [(0, 0, 0)] * 5 + [(4, 0, 0)] * 5 + [(4, 0, 4)] * 5 + [(0, 0, 4)]
    poses = poses_at(places)
    chosen = coverage_indices(poses, 4)
    assert sorted({places[index] for index in chosen}) == sorted(set(places))
    assert len(coverage_indices(poses, 10)) == 4  # only four places: no repeats to fill the count
    uniform = choose_views(poses, 4, "uniform")
    assert uniform == [0, 5, 10, 15]
    assert {places[index] for index in choose_views(poses[:15], 2, "uniform")} == {(0, 0, 0), (4, 0, 4)}


def test_coverage_tells_directions_apart_at_one_place():
    poses = poses_at([(0, 0, 0)] * 6, yaw=[0, 0, 0, math.pi, math.pi, math.pi])
    chosen = coverage_indices(poses, 2)
    assert {round(float(poses[index, 0, 2])) for index in chosen} == {0}  # both have sin(yaw) = 0 ...
    assert sorted(round(float(poses[index, 2, 2])) for index in chosen) == [-1, 1]  # ... facing opposite ways


def test_coverage_leaves_out_views_without_a_camera():
    poses = poses_at([(0, 0, 0), (1, 0, 0), (9, 0, 0)])
    poses[2, :3, 3] = np.nan
    assert coverage_indices(poses, 3) == [0, 1]


def test_coverage_starts_from_the_first_view_with_a_camera():
    """A first view without a camera was chosen, and with its NaN distances every other view was left out."""
    poses = poses_at([(0, 0, 0), (1, 0, 0), (9, 0, 0), (5, 0, 0)])
    poses[0, :3, 3] = np.nan
    assert coverage_indices(poses, 2) == [1, 2]
    assert coverage_indices(poses, 3) == [1, 2, 3]


def test_without_any_camera_views_are_chosen_evenly(caplog):
    poses = poses_at([(k, 0, 0) for k in range(9)])
    poses[:, :3, 3] = np.nan
    assert coverage_indices(poses, 3) == []
    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            assert choose_views(poses, 3, "coverage") == choose_views(poses, 3, "uniform") == [0, 4, 8]
    finally:
        logging.disable_propagation()
    assert "No view has a usable camera" in caplog.text


@pytest.mark.parametrize("by", ["coverage", "uniform"])
def test_ask_about_a_long_sequence_names_the_views_it_used(small_views_model, tmp_path, monkeypatch, capsys, by):
    # 16 views of 4 places (a camera pausing long at the first), then the question on 4 views
    levels = [0] * 9 + [1] * 3 + [2] * 2 + [3] * 2
    folder, scene = tmp_path / "views", tmp_path / "scene"
    write_grey_views(folder, levels)
    processor = AutoProcessor.from_pretrained(small_views_model)
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: KnownGeometry(processor, walk_poses(4)))
    asked = []

    def answer(model, processor, views, question, max_new_tokens, **kwargs):
        asked.extend(round(float(np.asarray(view).mean()) - 20) // 10 for view in views)
        return "by the wall"

    monkeypatch.setattr("g2vlm_hf.chat.answer", answer)
    args = ["reconstruct", "--model", str(small_views_model), "--folder", str(folder), "--chunk-size", "6",
            "--overlap", "2", "--output", str(scene), "--device", "cpu", "--ask", "Where is the chair?",
            "--ask-views", "4", "--ask-views-by", by]  # fmt: skip
    assert g2vlm(args) == 0

    document = json.loads((scene / "answer.json").read_text())
    assert document["answer"] == "by the wall" and document["views_chosen_by"] == by
    indices = [int(name.removesuffix(".png")) for name in document["views"]]
    assert asked == [levels[index] for index in indices]  # the views asked about are the ones named
    assert ", ".join(document["views"]) in capsys.readouterr().err
    if by == "coverage":
        assert sorted(asked) == [0, 1, 2, 3]  # one view of each place
    else:
        assert indices[0] == 0 and indices[-1] == 15
        assert max(np.diff(indices)) - min(np.diff(indices)) <= 1  # evenly spaced, whatever it shows
        assert sorted(set(asked)) != [0, 1, 2, 3]  # and so, here, not one view of each place
