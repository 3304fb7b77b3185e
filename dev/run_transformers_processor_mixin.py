"""Run transformers' own `ProcessorTesterMixin` (tests/test_processing_common.py of the transformers source
distribution) against G2VLMProcessor, without copying it into this project.

    pip install parameterized
    python dev/run_transformers_processor_mixin.py                      # fetches the sdist of the installed version
    python dev/run_transformers_processor_mixin.py --transformers-src /path/to/transformers-5.24.0 -k kwargs -v

The sdist is fetched with `pip download --no-binary :all: --no-deps transformers==<installed version>` into
`--cache-dir` (default `~/.cache/g2vlm-hf-dev`) and extracted there. The processor under test is the one
`g2vlm-convert` writes for the official tiny checkpoint of `../shared/fixtures/official-tiny`.

Adaptations, all in `G2VLMProcessorTest` below and none changing what a test asserts:
- `model_id` is the saved processor folder (the mixin loads every component from it);
- the `max_length`s of the image kwargs tests are raised above the 729 tokens of one 768x768 semantic image (the
  mixin declares them for such overrides);
- `get_component("geometry_image_processor")` loads our geometry processor (the mixin only knows transformers'
  component kinds), and `get_component("image_processor")` the semantic (Qwen2-VL) image processor of the saved
  processor: the mixin loads it with `AutoImageProcessor`, which for a G2VLM folder gives the geometry image
  processor (saved as "image_processor" for the depth-estimation pipeline; the Qwen2-VL one is saved as
  "semantic_image_processor");
- the tests that do not apply to G2VLM are skipped, each with its reason (`NOT_APPLICABLE`);
- the sdist lacks transformers' `utils/fetch_hub_objects_for_ci.py` (it maps test-asset URLs to a CI cache); a
  stand-in maps the COCO sample image URL to a local PNG and leaves other URLs as they are (the Hub is unreachable
  here, so tests that fetch video or audio URLs fail or skip for that reason).

Prints one line per test (with `-v`) and the pass/fail/error/skip counts; exits 1 when a test fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path

import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "official-tiny"
COCO_SAMPLE_SUFFIX = "fixtures_image_utils/resolve/main/coco_sample.png"


def transformers_source(cache_dir: Path) -> Path:
    """Folder of the extracted sdist of the installed transformers, downloaded with pip when absent."""
    version = transformers.__version__
    target = cache_dir / f"transformers-{version}"
    if (target / "tests" / "test_processing_common.py").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"transformers-{version}.tar.gz"
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        subprocess.run([*command, f"transformers=={version}", "-d", str(cache_dir)], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(cache_dir, filter="data")
    return target


def install_hub_asset_stub(image_path: Path) -> None:
    """Stand-in for transformers' `utils/fetch_hub_objects_for_ci.py`, which the sdist does not ship."""
    stub = types.ModuleType("fetch_hub_objects_for_ci")

    def url_to_local_path(url: str, return_url_if_not_found: bool = True) -> str:
        return str(image_path) if url.endswith(COCO_SAMPLE_SUFFIX) else url

    stub.url_to_local_path = url_to_local_path
    sys.modules["fetch_hub_objects_for_ci"] = stub


def load_mixin(source: Path) -> type:
    spec = importlib.util.spec_from_file_location(
        "transformers_test_processing_common", source / "tests" / "test_processing_common.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ProcessorTesterMixin


def saved_processor(folder: Path) -> Path:
    """The processor `g2vlm-convert` writes for the official tiny checkpoint, saved into `folder`."""
    from g2vlm_hf.conversion.convert_official import _build_processor, _load_tokenizer

    checkpoint = FIXTURE_DIR / "checkpoint"
    _build_processor(checkpoint, _load_tokenizer(checkpoint)).save_pretrained(folder)
    return folder


# Tests of the mixin that cannot hold for G2VLM, and why (each reason says where G2VLM tests the same property).
NOT_APPLICABLE = {
    "test_processor_from_and_save_pretrained_as_nested_dict": (
        "the mixin reloads every processor attribute with the Auto class named by the attribute: "
        "`geometry_image_processor` names none (KeyError in MODALITY_TO_AUTOPROCESSOR_MAPPING), and AutoImageProcessor "
        "of a G2VLM folder is the geometry image processor by design (depth-estimation pipeline); the round trip of "
        "both image processors is tested in tests/test_processor_layout.py and tests/test_depth_estimation.py"
    ),
    "test_model_input_names": (
        "the mixin's call passes text, images, videos and audio only, and its text holds `<|image_pad|>` only, so the "
        "`geometry_pixel_values` of `model_input_names` (geometry views, from `geometry_images` or `<|geo_pad|>` "
        "placeholders) cannot appear; tests/test_processor.py checks the names against a call with both kinds"
    ),
    "test_processor_text_has_no_visual": (
        "a batch whose prompts have geometry views and prompts without is refused on purpose (the views are stacked "
        "per prompt in `geometry_pixel_values`; the error says to process the prompts separately); the mixin's "
        "batch of a plain-text chat with an image chat (the chat template makes each image a geometry view too) is "
        "such a batch"
    ),
}


def make_test_case(mixin: type, model_id: Path) -> type:
    import g2vlm_hf  # noqa: F401  (registers the Auto classes)
    from g2vlm_hf import G2VLMGeometryImageProcessor, G2VLMProcessor

    class G2VLMProcessorTest(mixin, unittest.TestCase):
        processor_class = G2VLMProcessor
        # The mixin's knobs for processors whose images take many tokens: a semantic image is resized to 768x768
        # (the official chat), 729 tokens, which the default `max_length`s (76 to 117) would cut.
        images_text_kwargs_max_length = 1000
        images_text_kwargs_override_max_length = 990
        images_unstructured_max_length = 900

        def get_component(self, attribute, use_tiny_ckpt=True, **kwargs):
            if attribute == "geometry_image_processor":
                return G2VLMGeometryImageProcessor(**kwargs)
            if attribute == "image_processor":  # the saved Qwen2-VL one; AutoImageProcessor gives the geometry one
                return G2VLMProcessor.from_pretrained(self.tmpdirname, **kwargs).image_processor
            return super().get_component(attribute, use_tiny_ckpt=use_tiny_ckpt, **kwargs)

    for name, reason in NOT_APPLICABLE.items():
        if hasattr(G2VLMProcessorTest, name):  # the mixins of some releases lack some tests
            setattr(G2VLMProcessorTest, name, unittest.skip(f"not applicable to G2VLM: {reason}")(lambda self: None))
    G2VLMProcessorTest.model_id = str(model_id)
    return G2VLMProcessorTest


class CountingResult(unittest.TextTestResult):
    """Keeps every outcome, so the summary can list them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed: list[str] = []

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test.id())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformers-src", type=Path, help="extracted transformers sdist (default: fetch it)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "g2vlm-hf-dev")
    parser.add_argument("-k", dest="pattern", action="append", help="run only tests whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()

    source = args.transformers_src or transformers_source(args.cache_dir)
    install_hub_asset_stub(FIXTURE_DIR / "images" / "chat.png")
    mixin = load_mixin(source)
    with tempfile.TemporaryDirectory() as folder:
        test_case = make_test_case(mixin, saved_processor(Path(folder)))
        loader = unittest.TestLoader()
        if args.pattern:
            loader.testNamePatterns = [f"*{pattern}*" for pattern in args.pattern]
        suite = loader.loadTestsFromTestCase(test_case)
        runner = unittest.TextTestRunner(verbosity=2 if args.verbose else 1, resultclass=CountingResult)
        result = runner.run(suite)

    print(f"\ntransformers {transformers.__version__}, mixin from {source}")
    print(
        f"passed {len(result.passed)}, failed {len(result.failures)}, errors {len(result.errors)}, "
        f"skipped {len(result.skipped)}, total {result.testsRun}"
    )
    for label, outcomes in (("FAILED", result.failures), ("ERROR", result.errors)):
        for test, _ in outcomes:
            print(f"{label} {test.id().rsplit('.', 1)[-1]}")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
