"""How the command line picks its views (`g2vlm_hf.inputs.views`), where mutation testing found nothing checking it:
the default frame interval of a video, `--max-views` at its edges, the description that names the views in messages,
the "Reading views" progress bar and the refusal of too many views exactly at the limit. Real image files and videos
are written into tmp_path."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import write_video
from PIL import Image
from transformers.utils import logging

from g2vlm_hf.inputs import InputError, folder_views, image_views, open_views


def write_images(folder, count: int, suffix: str = "png") -> list:
    """`count` small distinct RGB images `view_0.<suffix>`, ... in `folder`; their paths, in name order."""
    folder.mkdir(exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"view_{index}.{suffix}"
        Image.fromarray(np.full((8, 12, 3), 20 * index, np.uint8)).save(path)
        paths.append(path)
    return paths


def grey_frames(count: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((32, 32, 3), 5 * index, np.uint8)) for index in range(count)]


def test_a_video_without_every_gives_one_frame_in_ten(tmp_path):
    """Documented default: one frame in 10 of a video (frames 0, 10, 20 of 25) unless `--every` says otherwise."""
    video = write_video(tmp_path / "walk.mp4", grey_frames(25))
    views = open_views(video=video)
    assert views.names == ["walk.mp4#frame0", "walk.mp4#frame10", "walk.mp4#frame20"]
    assert "one in 10" in views.description
    assert len(list(views)) == 3
    assert open_views(video=video, every=1).names == [f"walk.mp4#frame{index}" for index in range(25)]


def test_image_files_and_folders_default_to_every_view(tmp_path):
    """Without `every`, image files (API default and `open_views` default) and folders keep every view."""
    paths = write_images(tmp_path / "views", 3)
    names = [path.name for path in paths]
    assert image_views(paths).names == names
    assert open_views(images=paths).names == names
    assert folder_views(tmp_path / "views").names == names
    assert image_views(paths).description == "image files"


def test_max_views_keeps_the_first_views_and_accepts_one(tmp_path):
    """`--max-views N` keeps the first N (N >= 1 is valid, as its flag says; one view asked for is not refused)."""
    paths = write_images(tmp_path / "views", 5)
    assert image_views(paths, max_views=2).names == ["view_0.png", "view_1.png"]
    assert open_views(folder=tmp_path / "views", max_views=3).names == ["view_0.png", "view_1.png", "view_2.png"]
    assert image_views(paths, max_views=1).names == ["view_0.png"]
    assert image_views(paths, every=2, max_views=2).names == ["view_0.png", "view_2.png"]
    assert image_views(paths, max_views=9).names == [path.name for path in paths]  # more than there are: all
    for bad in (0, -1):
        with pytest.raises(InputError, match=f"--max-views must be at least 1, got {bad}"):
            image_views(paths, max_views=bad)


def test_the_description_of_image_files_names_the_interval(tmp_path):
    """The views' description (used in messages) says "one in K" only when `every` K > 1 subsamples them."""
    paths = write_images(tmp_path / "views", 6)
    assert image_views(paths, every=1).description == "image files"
    assert image_views(paths, every=2).description == "image files, one in 2"
    assert image_views(paths, every=3).description == "image files, one in 3"
    with pytest.raises(InputError, match=r"^3 views \(image files, one in 2\) are more than 2: use fewer$"):
        image_views(paths, every=2).check_at_most(2, "use fewer")


def test_exactly_the_limit_of_views_is_accepted(tmp_path):
    """`check_at_most(limit)` refuses more than `limit` views, not `limit` itself."""
    views = image_views(write_images(tmp_path / "views", 4))
    views.check_at_most(4, "unused advice")
    views.check_at_most(5, "unused advice")
    with pytest.raises(InputError, match=r"4 views \(image files\) are more than 3: split them"):
        views.check_at_most(3, "split them")


def test_loading_the_views_shows_a_reading_views_bar_with_the_count(tmp_path, capsys):
    """`loaded()` reads every view once behind a progress bar "Reading views" that counts views up to their total."""
    paths = write_images(tmp_path / "views", 3)
    was_enabled = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    try:
        capsys.readouterr()
        loaded = image_views(paths).loaded()
        err = capsys.readouterr().err
    finally:
        if not was_enabled:
            logging.disable_progress_bar()
    assert "Reading views" in err and "3/3" in err, err
    assert re.search(r"view/s|s/view", err) and not re.search(r"it/s|s/it", err), err  # counted in views
    images = list(loaded)
    assert [image.size for image in images] == [(12, 8)] * 3
    assert [int(np.asarray(image)[0, 0, 0]) for image in images] == [0, 20, 40]


def test_an_every_that_keeps_one_of_several_image_files_is_refused(tmp_path):
    """Several files subsampled down to one view are refused (as for a video), even two files with `every` 2; one
    file alone, or `max_views` 1, asks for one view and is accepted."""
    paths = write_images(tmp_path / "views", 3)
    with pytest.raises(
        InputError,
        match=r"--every 3 keeps 1 of the 3 image files; .* at least 2 views: use a smaller --every \(at most 2\)",
    ):
        image_views(paths, every=3)
    with pytest.raises(InputError, match=r"--every 2 keeps 1 of the 2 image files"):
        image_views(paths[:2], every=2)
    assert image_views(paths[:1]).names == ["view_0.png"]
    assert image_views(paths[:1], every=5).names == ["view_0.png"]
    assert image_views(paths, every=3, max_views=1).names == ["view_0.png"]
    assert image_views(paths, every=2).names == ["view_0.png", "view_2.png"]


def test_video_views_defaults_to_every_frame_and_accepts_two(tmp_path):
    """`video_views` (the API) keeps every frame by default; a video of two frames gives a two-view scene."""
    from g2vlm_hf.inputs import video_views

    five = write_video(tmp_path / "five.mp4", grey_frames(5))
    assert video_views(five).names == [f"five.mp4#frame{index}" for index in range(5)]
    assert video_views(five).description == f"frames of {five}"
    two = write_video(tmp_path / "two.mp4", grey_frames(2))
    assert open_views(video=two, every=1).names == ["two.mp4#frame0", "two.mp4#frame1"]
    assert video_views(two).names == ["two.mp4#frame0", "two.mp4#frame1"]
    assert len(list(video_views(two))) == 2
    assert video_views(five, every=4).names == ["five.mp4#frame0", "five.mp4#frame4"]
    assert video_views(five, every=2).description == f"frames of {five}, one in 2"


def test_video_frames_defaults_to_every_frame(tmp_path):
    """`video_frames` (the list the demo reads) keeps every frame by default, at most `max_frames`."""
    from g2vlm_hf.inputs import video_frames

    frames = grey_frames(5)
    video = write_video(tmp_path / "five.mp4", frames)
    read = video_frames(video)
    assert len(read) == 5 and all(image.size == (32, 32) for image in read)
    levels = [float(np.asarray(image).mean()) for image in read]
    assert levels == sorted(levels) and levels[-1] - levels[0] > 10  # in order: grey 0, 5, ..., 20
    assert len(video_frames(video, max_frames=2)) == 2


def test_max_views_caps_the_frames_of_a_video(tmp_path):
    """`--max-views N` keeps the first N of the frames `--every` picks, and no more are read."""
    video = write_video(tmp_path / "walk.mp4", grey_frames(12))
    views = open_views(video=video, every=2, max_views=3)
    assert views.names == ["walk.mp4#frame0", "walk.mp4#frame2", "walk.mp4#frame4"]
    assert len(list(views)) == 3
    assert open_views(video=video, every=1, max_views=20).names == [f"walk.mp4#frame{i}" for i in range(12)]
    assert open_views(video=video, every=1, max_views=1).names == ["walk.mp4#frame0"]


def test_two_frames_subsampled_to_one_are_refused_as_a_subsampling(tmp_path):
    """A video of two frames with `--every 2` keeps one: the refusal names the interval (the video does hold two
    frames; "a single frame" is for a one-frame video)."""
    two = write_video(tmp_path / "two.mp4", grey_frames(2))
    with pytest.raises(InputError, match="--every 2 keeps 1 of the 2 frames") as refused:
        open_views(video=two, every=2)
    assert "single frame" not in str(refused.value)
    one = write_video(tmp_path / "one.mp4", grey_frames(1))
    with pytest.raises(InputError, match="holds a single frame"):
        open_views(video=one, every=1)
    single = open_views(video=one, every=1, max_views=1)  # one view asked for: accepted
    assert single.names == ["one.mp4#frame0"] and len(list(single)) == 1


def test_spread_video_views_takes_one_or_more_frames_first_and_last_included(tmp_path):
    """`--views N` frames spread uniformly over the video (first and last included); N = 1 is valid, N = 0 is not."""
    from g2vlm_hf.inputs import spread_video_views

    video = write_video(tmp_path / "five.mp4", grey_frames(5))
    assert spread_video_views(video, 3).names == ["five.mp4#frame0", "five.mp4#frame2", "five.mp4#frame4"]
    assert spread_video_views(video, 2).names == ["five.mp4#frame0", "five.mp4#frame4"]
    one = spread_video_views(video, 1)
    assert len(one) == 1 and one.names[0].startswith("five.mp4#frame") and len(list(one)) == 1
    with pytest.raises(InputError, match="--views must be at least 1, got 0"):
        spread_video_views(video, 0)
