"""The transformers-native ways to depth: `AutoImageProcessor` gives the geometry image processor,
`AutoModelForDepthEstimation` gives `G2VLMForDepthEstimation`, and `pipeline("depth-estimation")` runs on a converted
folder. The depth must be the reconstruction's depth."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForDepthEstimation,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)

from g2vlm_hf import G2VLMForDepthEstimation, G2VLMGeometryImageProcessor, G2VLMProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_testing import VIEWS, fast_tiny_copy


@pytest.fixture(scope="module")
def folder(converted_tiny, tmp_path_factory) -> Path:
    return fast_tiny_copy(converted_tiny, tmp_path_factory.mktemp("depth") / "model")


def test_auto_image_processor_is_the_geometry_one_and_auto_processor_still_loads(folder, tmp_path):
    document = json.loads((folder / "processor_config.json").read_text())
    assert document["image_processor"]["image_processor_type"] == "G2VLMGeometryImageProcessor"
    assert document["semantic_image_processor"]["image_processor_type"].startswith("Qwen2VLImageProcessor")
    image_processor = AutoImageProcessor.from_pretrained(folder)
    assert type(image_processor) is G2VLMGeometryImageProcessor and image_processor.target_width == 112
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is G2VLMProcessor
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert processor.geometry_image_processor.to_dict() == image_processor.to_dict()
    # the image processor alone gives the same views as the processor, and no prompt (the depth model builds it)
    alone, full = (
        image_processor([[str(v) for v in VIEWS]]),
        processor(geometry_images=[str(v) for v in VIEWS], return_tensors="pt"),
    )
    assert set(alone) == {"geometry_pixel_values"}
    torch.testing.assert_close(alone["geometry_pixel_values"], full["geometry_pixel_values"])

    # save -> load keeps every setting of both image processors
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.geometry_image_processor.to_dict() == processor.geometry_image_processor.to_dict()
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is G2VLMGeometryImageProcessor


def test_older_layout_still_loads(folder, tmp_path):
    """Folders converted before: "image_processor" = Qwen2-VL, "geometry_image_processor" = geometry."""
    old = fast_tiny_copy(folder, tmp_path / "old")
    document = json.loads((old / "processor_config.json").read_text())
    document["geometry_image_processor"] = document.pop("image_processor")
    document["image_processor"] = document.pop("semantic_image_processor")
    (old / "processor_config.json").write_text(json.dumps(document))
    processor = AutoProcessor.from_pretrained(old)
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert type(processor.geometry_image_processor) is G2VLMGeometryImageProcessor


def test_depth_model_equals_the_reconstruction(folder):
    model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    assert type(model) is G2VLMForDepthEstimation
    full = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = AutoImageProcessor.from_pretrained(folder)([[str(v) for v in VIEWS]])
    prompt = processor(geometry_images=[str(v) for v in VIEWS], return_tensors="pt")
    # the model builds the processor's reconstruction prompt from the views alone
    assert torch.equal(model.reconstruction_prompt(inputs["geometry_pixel_values"]), prompt["input_ids"])
    with torch.no_grad():
        output = model(**inputs)
        expected = full.reconstruct(**prompt)
    views, height, width = expected.depth.shape[1:]
    assert output.predicted_depth.shape == (views, height, width)
    torch.testing.assert_close(output.predicted_depth, expected.depth[0])  # several views reconstructed together
    torch.testing.assert_close(output.reconstruction.intrinsics, expected.intrinsics)


def test_depth_model_has_no_semantic_encoder_and_float32_heads(folder):
    model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.model.visual is None
    assert not any(name.startswith("model.visual.") for name in model.state_dict())
    assert {parameter.dtype for parameter in model.geometry_heads.parameters()} == {torch.float32}
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:  # built directly under a half-precision default, as the other model classes, the heads are float32 too
        built = G2VLMForDepthEstimation(model.config)
    finally:
        torch.set_default_dtype(previous)
    assert {parameter.dtype for parameter in built.geometry_heads.parameters()} == {torch.float32}


def test_depth_model_without_prompt_ids_says_how_to_get_them(folder):
    model = AutoModelForDepthEstimation.from_pretrained(folder)
    model.config.reconstruction_prompt_ids = None
    with pytest.raises(ValueError, match="reconstruction_prompt_ids"):
        model(**AutoImageProcessor.from_pretrained(folder)(str(VIEWS[0])))


def reconstructed_depth(folder: Path, views: list[str]) -> torch.Tensor:
    """`(views, H, W)` depth of one joint reconstruction of `views` by the chat model (not the depth model)."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    inputs = AutoProcessor.from_pretrained(folder)(geometry_images=views, return_tensors="pt")
    with torch.no_grad():
        return model.reconstruct(**inputs).depth[0]


def test_post_processing_resizes_bilinearly_between_pixel_centres(folder):
    """Bilinear resizing keeps a linear ramp linear: each output pixel centre maps back to the input coordinate
    `(i + 0.5) * in / out - 0.5`, clamped to the input's border pixels."""
    height, width, out_height, out_width = 14, 20, 37, 51
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ramp = 2.0 + 0.1 * rows + 0.05 * columns
    [result] = AutoImageProcessor.from_pretrained(folder).post_process_depth_estimation(
        {"predicted_depth": ramp[None]}, target_sizes=[(out_height, out_width)]
    )

    def source(index: torch.Tensor, size: int, out_size: int) -> torch.Tensor:
        return ((index + 0.5) * size / out_size - 0.5).clamp(0, size - 1)

    out_rows, out_columns = torch.meshgrid(torch.arange(out_height), torch.arange(out_width), indexing="ij")
    expected = 2.0 + 0.1 * source(out_rows, height, out_height) + 0.05 * source(out_columns, width, out_width)
    torch.testing.assert_close(result["predicted_depth"], expected.float())
    with pytest.raises(ValueError, match="2 target sizes for 1 depth maps"):
        AutoImageProcessor.from_pretrained(folder).post_process_depth_estimation(
            {"predicted_depth": ramp[None]}, target_sizes=[(3, 3), (4, 4)]
        )
    with pytest.raises(ValueError, match=r"must be \(views, height, width\).*got shape \(1, 1, 14, 20\).*flatten"):
        AutoImageProcessor.from_pretrained(folder).post_process_depth_estimation({"predicted_depth": ramp[None, None]})


def test_depth_estimation_pipeline(folder):
    estimator = pipeline("depth-estimation", model=str(folder))
    assert type(estimator.model) is G2VLMForDepthEstimation
    with Image.open(VIEWS[0]) as image:
        size = image.size
    result = estimator(str(VIEWS[0]))
    assert result["predicted_depth"].shape == (size[1], size[0])  # at the input image's size
    assert isinstance(result["depth"], Image.Image) and result["depth"].size == size
    assert (result["predicted_depth"] > 0).all()

    # the depth of the view reconstructed on its own by the chat model, resized (bilinear, as tested below)
    direct = reconstructed_depth(folder, [str(VIEWS[0])])
    resized = F.interpolate(direct[:, None].float(), size=size[::-1], mode="bilinear")[0, 0]
    torch.testing.assert_close(result["predicted_depth"], resized)
    depth = np.asarray(result["depth"], dtype=np.float64)
    assert depth.min() == 0 and depth.max() == 255

    several = estimator([str(view) for view in VIEWS])  # a list: one result per image
    assert len(several) == len(VIEWS) and all(r["predicted_depth"].ndim == 2 for r in several)


def test_pipeline_takes_several_views_of_one_scene(folder):
    from g2vlm_hf.pipelines import G2VLMDepthEstimationPipeline

    estimator = pipeline("depth-estimation", model=str(folder), pipeline_class=G2VLMDepthEstimationPipeline)
    views = [str(view) for view in VIEWS]
    [scene] = estimator([views])
    assert len(scene) == len(views)

    # the same depth as one joint reconstruction of the views, resized to each image
    joint = reconstructed_depth(folder, views)
    for index, (result, view) in enumerate(zip(scene, views)):
        with Image.open(view) as image:
            size = image.size[::-1]
        expected = F.interpolate(joint[None, index : index + 1].float(), size=size, mode="bilinear")[0, 0]
        torch.testing.assert_close(result["predicted_depth"], expected)
        assert result["depth"].size == size[::-1]
    # a view reconstructed alone differs from the same view reconstructed with the others
    alone = estimator(views[1])["predicted_depth"]
    assert not torch.allclose(alone, scene[1]["predicted_depth"])
    assert estimator(views[0])["predicted_depth"].ndim == 2  # single images behave as in the standard pipeline


def test_pipeline_reads_16_bit_images_as_the_processor_does(folder, tmp_path):
    """transformers' `load_image` clips a 16-bit PNG to white; the G2VLM pipeline reads it as the processor does."""
    from g2vlm_hf.pipelines import G2VLMDepthEstimationPipeline

    gray = np.asarray(Image.open(VIEWS[0]).convert("L"), dtype=np.uint16)
    Image.fromarray(gray * 257).save(tmp_path / "16-bit.png")
    Image.fromarray(gray.astype(np.uint8)).convert("RGB").save(tmp_path / "8-bit.png")
    assert Image.open(tmp_path / "16-bit.png").mode == "I;16"
    estimator = pipeline("depth-estimation", model=str(folder), pipeline_class=G2VLMDepthEstimationPipeline)
    eight = estimator(str(tmp_path / "8-bit.png"))["predicted_depth"]
    torch.testing.assert_close(estimator(str(tmp_path / "16-bit.png"))["predicted_depth"], eight)
    [[scene_view]] = estimator([[str(tmp_path / "16-bit.png")]])
    torch.testing.assert_close(scene_view["predicted_depth"], eight)
