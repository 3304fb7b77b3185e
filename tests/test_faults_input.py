"""Issue 12: bad images give one clear error (API and CLI) instead of a hang, a traceback or a silent guess."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from g2vlm_hf.cli import main as g2vlm
from g2vlm_hf.processing.image_io import load_image
from g2vlm_hf.processing.image_processing_geometry import G2VLMGeometryImageProcessor


def png_claiming(path, width: int, height: int) -> None:
    """A tiny PNG file whose header claims `width` x `height` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_a_very_long_view_is_refused_with_the_token_estimate():
    with pytest.raises(ValueError, match=r"518x103600 geometry view of 27\d,\d{3} tokens"):
        G2VLMGeometryImageProcessor()(np.zeros((10000, 50, 3), np.uint8))


def test_an_extreme_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match=r"aspect 6\.0:1"):
        G2VLMGeometryImageProcessor()(np.zeros((100, 600, 3), np.uint8))


def test_views_of_different_sizes_need_an_opt_in():
    views = [np.zeros((30, 40, 3), np.uint8), np.zeros((40, 30, 3), np.uint8)]
    with pytest.raises(ValueError, match="resize_views_to_first=True"):
        G2VLMGeometryImageProcessor()(views)
    squashed = G2VLMGeometryImageProcessor(resize_views_to_first=True)(views)["geometry_pixel_values"]
    assert squashed.shape[:2] == (1, 2)


@pytest.mark.parametrize("image", [Image.new("RGB", (0, 0)), np.zeros((0, 0, 3), np.uint8)], ids=["pil", "array"])
def test_an_empty_image_is_a_clear_error(image):
    with pytest.raises(ValueError, match="empty"):
        G2VLMGeometryImageProcessor()(image)


def test_a_decompression_bomb_is_a_clear_error(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    png_claiming(bomb, 30000, 30000)
    with pytest.raises(ValueError, match="too large"):
        load_image(bomb)
    png_claiming(bomb, 12000, 12000)  # under Pillow's own guard, over ours
    with pytest.raises(ValueError, match="144,000,000 pixels, too large"):
        load_image(bomb)
    assert g2vlm(["chat", "--model", str(tmp_path), "--device", "cpu", "--image", str(bomb), "What?"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "too large" in err.strip().splitlines()[-1]


def test_a_folder_given_as_an_image_says_so(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an image file: pass the image files in it"):
        load_image(tmp_path)


def test_an_animated_gif_warns_and_folder_includes_gifs(tmp_path, caplog):
    from g2vlm_hf.inputs import images_in_folder

    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            image = load_image(tmp_path / "anim.gif")
    finally:
        logging.disable_propagation()
    assert image.getpixel((0, 0))[0] > 200 and "first frame" in caplog.text
    assert [p.name for p in images_in_folder(tmp_path)] == ["anim.gif"]


def test_the_too_many_views_message_gives_the_cli_fix():
    processor = G2VLMGeometryImageProcessor(max_views=2)
    with pytest.raises(ValueError, match="--every / --max-views on the command line"):
        processor([np.zeros((14, 14, 3), np.uint8)] * 3)


def test_chat_images_get_the_token_budget_too(converted_tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted_tiny)
    content = [{"type": "image", "image": np.zeros((10000, 50, 3), np.uint8)}, {"type": "text", "text": "What?"}]
    with pytest.raises(ValueError, match="tokens per view"):
        processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
        )


def test_an_unreadable_view_is_reported_on_its_own_line_after_the_progress_bar(
    converted_tiny, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("g2vlm_hf.model_loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    folder = tmp_path / "views"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    argv = ["reconstruct", "--model", str(converted_tiny), "--folder", str(folder), "--output", str(tmp_path / "out")]
    assert g2vlm(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("g2vlm: error:") and "b.png" in last and "Traceback" not in err
