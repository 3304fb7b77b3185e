"""Run transformers' own common model tests (`ModelTesterMixin`, `GenerationTesterMixin`) against G2VLM.

The mixins are imported from a transformers source tree's `tests/` folder; nothing of them is copied into this
project. transformers' sdist ships `tests/test_modeling_common.py` but not `tests/generation/test_utils.py` or
`tests/exporters/test_export.py`, which it imports: add them from the transformers repository (the generation file
as is; the export file may be a stub defining empty `ExportTesterMixin` and `ExportGenerateTesterMixin` classes).

    python dev/run_transformers_model_mixins.py --transformers-tests /path/to/transformers/tests [pytest args...]

e.g. `-k "generate and not beam"`, `-x`, `--tb=line`. Prints a pass/fail/skip summary (one outcome per test; a test
with a failed subtest counts once), every skip with its reason. Exit status: pytest's.

Harness used so far: transformers 5.24.0's sdist tests/ plus tests/generation/test_utils.py from the transformers
repository (a 5.16.0.dev0 checkout, Aug 2026: the newest stored; its `ExportGenerateTesterMixin` import is satisfied by
the stub). Without the repository's tests/generation/test_framework_agnostic.py nothing is lost: the 5.x test_utils.py
no longer imports it. For the model tests alone, a stand-in tests/generation/test_utils.py defining an empty
`GenerationTesterMixin` class works too (the generation tests then do not run): so were the 5.24.0 sdist tests run on
transformers 5.24.0 and the 5.25.0 sdist tests on 5.25.0 (Dec 2026), with no failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

ENV_TESTS_DIR = "G2VLM_TRANSFORMERS_TESTS"
MIXIN_MARKERS = (
    "accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "generate", "torch_compile_test",
    "torch_export_test", "is_training_test", "is_pipeline_test", "is_staging_test", "not_device_test", "slow",
)  # fmt: skip


def add_tests_package_to_path(tests_dir: str | os.PathLike) -> None:
    """Put the folder holding `tests/` on `sys.path`, so the mixins import as the package `tests` (they import each
    other relatively and as `tests.exporters...`)."""
    tests_dir = Path(tests_dir).resolve()
    if not (tests_dir / "test_modeling_common.py").is_file():
        raise SystemExit(f"{tests_dir} has no test_modeling_common.py: pass the `tests` folder of a transformers tree")
    missing = [p for p in ("generation/test_utils.py", "exporters/test_export.py") if not (tests_dir / p).is_file()]
    if missing:
        raise SystemExit(f"{tests_dir} lacks {missing}: add them from the transformers repository (see the docstring)")
    for package in (tests_dir, tests_dir / "generation", tests_dir / "exporters"):
        if not (package / "__init__.py").exists():
            raise SystemExit(f"{package} needs an __init__.py (an empty one) to import as a package")
    if str(tests_dir.parent) not in sys.path:
        sys.path.insert(0, str(tests_dir.parent))
    os.environ[ENV_TESTS_DIR] = str(tests_dir)


class Summary:
    """pytest plugin: one outcome per test (a test with a failed subtest counts as failed once), skip reasons."""

    def __init__(self):
        self.status: dict[str, str] = {}
        self.skip_reason: dict[str, str] = {}
        self.failed_subtests: dict[str, list[str]] = defaultdict(list)

    def pytest_configure(self, config):
        # the markers transformers' own conftest.py registers (it is not loaded here)
        for marker in MIXIN_MARKERS:
            config.addinivalue_line("markers", f"{marker}: transformers test marker")

    def _set(self, name: str, status: str) -> None:
        order = ("passed", "xpassed", "xfailed", "skipped", "failed", "error")
        if order.index(status) >= order.index(self.status.get(name, "passed")):
            self.status[name] = status

    def pytest_runtest_logreport(self, report):
        name = report.nodeid.split("::", 1)[-1]
        subtest = getattr(report, "context", None)
        if subtest is not None:  # a failed subtest fails its test; passed ones are not counted
            if report.failed:
                self._set(name, "failed")
                self.failed_subtests[name].append(str(getattr(subtest, "msg", None) or subtest.kwargs))
            return
        if report.when == "call" or report.outcome != "passed":
            if hasattr(report, "wasxfail"):
                self._set(name, "xfailed" if report.skipped else "xpassed")
            elif report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.skip_reason[name] = reason.removeprefix("Skipped: ")
                self._set(name, "skipped")
            elif report.failed:
                self._set(name, "failed" if report.when == "call" else "error")
            else:
                self._set(name, "passed")

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        counts = Counter(self.status.values())
        terminalreporter.section("G2VLM x transformers common tests")
        skips: dict[str, list[str]] = defaultdict(list)
        for name, reason in self.skip_reason.items():
            if self.status[name] == "skipped":
                skips[reason].append(name)
        if skips:
            write("skipped, by reason:")
            for reason, names in sorted(skips.items(), key=lambda item: (-len(item[1]), item[0])):
                write(f"  [{len(names)}] {reason}")
                for name in names:
                    write(f"        {name}")
        failed = sorted(name for name, status in self.status.items() if status in ("failed", "error"))
        if failed:
            write("failed:")
            for name in failed:
                subtests = self.failed_subtests.get(name, [])
                shown = ", ".join(subtests[:3]) + (f", ... ({len(subtests)} subtests)" if len(subtests) > 3 else "")
                write(f"  {name}" + (f"  [subtests: {shown}]" if subtests else ""))
        keys = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
        write(f"tests: {len(self.status)}; " + ", ".join(f"{key}: {counts[key]}" for key in keys if counts[key]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers-tests", required=True, help="the tests/ folder of a transformers source tree")
    args, pytest_args = parser.parse_known_args(argv)
    add_tests_package_to_path(args.transformers_tests)
    import pytest

    sys.dont_write_bytecode = True
    here = Path(__file__).resolve()
    # No cache folder (it would land in the project root); transformers' conftest.py is not loaded.
    base = [str(here), "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE", "--tb=short"]
    return int(pytest.main(base + pytest_args, plugins=[Summary()]))


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------------------------------------------------------------
# Imported by pytest from here on.

if ENV_TESTS_DIR not in os.environ:
    import pytest

    pytest.skip(
        f"run as a script with --transformers-tests (or set {ENV_TESTS_DIR} to a transformers tests/ folder)",
        allow_module_level=True,
    )
add_tests_package_to_path(os.environ[ENV_TESTS_DIR])

import unittest  # noqa: E402

import torch  # noqa: E402
from tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers.testing_utils import torch_device  # noqa: E402

from g2vlm_hf import G2VLMConfig, G2VLMForConditionalGeneration, G2VLMModel  # noqa: E402

# The mixins pick their per-class behaviour from transformers' built-in name tables (`MODEL_MAPPING_NAMES`: base
# models, skipped by the training tests and the only ones `test_inputs_embeds_matches_input_ids` and
# `test_base_model_prefix_loads_base_weights` check; `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`: given `labels` by
# `_prepare_for_class`, checked by the `get_image_features` and loss tests). `AutoModel.register` does not touch these
# tables, so enter G2VLM the way an in-tree VLM is entered (Qwen2-VL: base `Qwen2VLModel`, image-text-to-text
# `Qwen2VLForConditionalGeneration`). Only the name tables change; the lazy Auto mappings look registered classes up
# first and only iterate model types with a built-in config, so they are unaffected.
MODEL_MAPPING_NAMES.setdefault(G2VLMConfig.model_type, G2VLMModel.__name__)
MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(G2VLMConfig.model_type, G2VLMForConditionalGeneration.__name__)


class G2VLMModelTester:
    """Tiny G2VLM and a batch holding both media, after transformers' `Qwen2VLVisionText2TextModelTester`.

    Batch 7: `test_eager_matches_sdpa_inference` runs a batch of 7 and pads shorter inputs with random rows, which
    cannot make valid image grids or placeholder layouts; with 7 rows nothing is padded. Each row: random text, one
    geometry block (`views` views of `geo_grid` DINOv2 patches, each view wrapped in vision start/end markers), one
    semantic image (`<start> <image> <end>`), random text, and a final padding token masked out (as in the Qwen2-VL
    tester). As there, every semantic image is a single 14x14 patch with
    `spatial_merge_size=1`, so `pixel_values` has one row per sample and survives the generation tests' slicing of
    every tensor input to the first `batch_size` rows; `geometry_pixel_values` is `(batch, views, 3, H, W)`.
    """

    def __init__(
        self,
        parent,
        batch_size=7,
        text_length=7,
        views=2,
        geo_grid=(2, 2),
        is_training=True,
        text_config=None,
        vision_config=None,
        geometry_config=None,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.vision_start_token_id, self.vision_end_token_id = 3, 4
        self.image_token_id, self.geometry_token_id = 5, 6
        self.text_config = text_config or {
            "vocab_size": 99,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            # mrope sections sum to head_dim / 2 = 8
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        self.vision_config = vision_config or {
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": self.text_config["hidden_size"],  # the merger's output width is the decoder's
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 1,
            "temporal_patch_size": 2,
        }
        self.geometry_config = geometry_config or {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": 28,
            "num_register_tokens": 4,
        }
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.num_channels = 3
        self.patch_size = self.vision_config["patch_size"]
        self.image_size = self.patch_size  # one patch per semantic image
        self.views, self.geo_grid = views, geo_grid
        self.text_length = text_length
        geo_tokens = views * (geo_grid[0] * geo_grid[1] + 2)
        self.seq_length = 1 + geo_tokens + 3 + text_length + 1  # bos-ish text token, geometry, image, text, pad

    def get_config(self) -> G2VLMConfig:
        return G2VLMConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            geometry_config=self.geometry_config,
            image_token_id=self.image_token_id,
            geometry_token_id=self.geometry_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            head_depth=1,
            head_num_attention_heads=4,
            point_head_hidden_size=32,
            camera_head_hidden_size=32,
            use_confidence_head=True,
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        temporal = self.vision_config["temporal_patch_size"]
        pixel_values = floats_tensor([self.batch_size, self.num_channels * temporal * self.patch_size**2])
        height, width = (side * self.geometry_config["patch_size"] for side in self.geo_grid)
        geometry_pixel_values = floats_tensor([self.batch_size, self.views, self.num_channels, height, width])
        return config, pixel_values, geometry_pixel_values

    def geometry_targets(self, geometry_pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Known geometry of the views, G2VLM's labels for its geometry heads (which only run with them): cameras
        translated from the origin, every point in front of its camera. The same on every call (`_prepare_for_class`
        builds them afresh for each forward a test compares)."""
        batch, views, _, height, width = geometry_pixel_values.shape
        generator = torch.Generator().manual_seed(0)
        poses = torch.eye(4).repeat(batch, views, 1, 1)
        poses[..., :3, 3] = torch.randn(batch, views, 3, generator=generator)
        camera_points = torch.rand(batch, views, height, width, 3, generator=generator) - 0.5
        camera_points[..., 2] += 1.5  # depth in [1, 2]
        world_points = camera_points + poses[..., None, None, :3, 3]  # identity rotations
        return {
            "world_points": world_points.to(torch_device),
            "valid_mask": torch.ones(batch, views, height, width, dtype=torch.bool, device=torch_device),
            "camera_poses": poses.to(torch_device),
        }

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, geometry_pixel_values = self.prepare_config_and_inputs()
        special = torch.tensor(
            [self.vision_start_token_id, self.vision_end_token_id, self.image_token_id, self.geometry_token_id]
        )
        text = ids_tensor([self.batch_size, 1 + self.text_length], self.vocab_size)
        text[torch.isin(text, special)] = self.pad_token_id
        view = [self.vision_start_token_id, *[self.geometry_token_id] * (self.geo_grid[0] * self.geo_grid[1])]
        geometry = torch.tensor(([*view, self.vision_end_token_id]) * self.views).expand(self.batch_size, -1)
        image = torch.tensor([self.vision_start_token_id, self.image_token_id, self.vision_end_token_id])
        input_ids = torch.cat(
            [
                text[:, :1],
                geometry,
                image.expand(self.batch_size, -1),
                text[:, 1:],
                torch.full((self.batch_size, 1), self.pad_token_id),
            ],
            dim=1,
        ).to(torch_device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[:, -1] = 0
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_thw": torch.tensor([[1, 1, 1]] * self.batch_size, device=torch_device),
            "geometry_pixel_values": geometry_pixel_values,
        }
        return config, inputs_dict


class G2VLMModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (G2VLMModel, G2VLMForConditionalGeneration)
    _is_composite = True
    # The inputs besides `input_ids` that the tests feeding only the main input (eager vs sdpa, ...) must also pass:
    # the prompt's placeholders need their media (G2VLM raises on placeholders without media).
    additional_model_inputs = ["pixel_values", "image_grid_thw", "geometry_pixel_values"]

    def setUp(self):
        self.model_tester = G2VLMModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # transformers gives the LM head its `labels` (the head is in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES);
        # G2VLM's geometry heads run and train only with `geometry_targets`, its labels for them.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is G2VLMForConditionalGeneration:
            inputs_dict["geometry_targets"] = self.model_tester.geometry_targets(inputs_dict["geometry_pixel_values"])
        return inputs_dict

    def _image_features_prepare_config_and_inputs(self):
        # transformers keeps every input whose name holds "pixel": not the geometry views, which are no input of
        # `get_image_features` (it would pass them on to the vision tower as an unknown keyword)
        config, inputs_dict = super()._image_features_prepare_config_and_inputs()
        inputs_dict.pop("geometry_pixel_values", None)
        return config, inputs_dict

    def _image_features_get_expected_num_attentions(self, model_tester=None):
        # transformers reads `vision_config["num_hidden_layers"]`, else the text depth; Qwen2-VL's ViT calls it `depth`
        return self.model_tester.vision_config["depth"]

    def test_generate_continue_from_inputs_embeds(self):
        # The mixin skips models whose top-level config has no `use_cache` ("doesn't support caching"); its own TODO
        # says the check belongs on `config.get_text_config()`, where G2VLM (like Qwen2-VL) keeps it. Give the
        # top-level config the attribute so that the test runs; the model reads `text_config.use_cache`.
        get_config = self.model_tester.get_config

        def get_config_with_use_cache():
            config = get_config()
            config.use_cache = config.text_config.use_cache
            return config

        if not hasattr(GenerationTesterMixin, "test_generate_continue_from_inputs_embeds"):
            self.skipTest("the harness's tests/generation/test_utils.py is a stand-in without the generation tests")
        self.model_tester.get_config = get_config_with_use_cache
        super().test_generate_continue_from_inputs_embeds()

    @unittest.skip(
        reason="G2VLM positions are 3D multimodal RoPE, which this test must not get as 1D position_ids: the mixin "
        "skips such models by looking for a `get_rope_index` method, and G2VLM's is `G2VLMModel.compute_position_ids`"
    )
    def test_generate_with_and_without_position_ids(self):
        pass

    def _get_logits_processor_kwargs(self, do_sample=False, config=None):
        # transformers bans the image/video/vision-marker ids from being generated (its "band-aid for VLMs": a
        # generated placeholder would ask for media features that do not exist); it does not know the geometry
        # placeholder, which is the same kind of token.
        kwargs = super()._get_logits_processor_kwargs(do_sample=do_sample, config=config)
        if config is not None and config.geometry_token_id < config.get_text_config().vocab_size:
            kwargs["bad_words_ids"].append([config.geometry_token_id])
        return kwargs


# The mixin's parametrised RoPE-scaling test (one test per scaling type) feeds random `input_ids` drawn from the whole
# vocabulary, with no media: they hold G2VLM's image and geometry placeholders, which G2VLM refuses without their
# media (a clear error rather than a wrong forward). The RoPE of the decoder is G2VLM's 3D multimodal RoPE.
for _name in [name for name in dir(ModelTesterMixin) if name.startswith("test_model_rope_scaling_from_config")]:
    setattr(
        G2VLMModelTest,
        _name,
        unittest.skip(
            "not applicable to G2VLM: random input_ids over the whole vocabulary hold media placeholders without "
            "media, which G2VLM refuses (`_check_placeholders_have_media`)"
        )(lambda self: None),
    )
