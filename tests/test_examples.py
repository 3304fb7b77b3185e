"""The example scripts run offline on the converted tiny fixture (each in its own process, as a user runs them)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import FIXTURE_DIR, greedy_answer
from fixture_paths import REPO_ROOT
from transformers import AutoModelForImageTextToText, AutoProcessor

EXAMPLES = REPO_ROOT / "examples"


def run_example(name: str, *args: str, cwd) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def example_views(count: int = 3) -> list:
    """`count` of the examples' default views (a synthetic room rendered on the spot; 3 unless a script asks for
    fewer), made by their own helper: the inputs the scripts chat about when given no views."""
    spec = importlib.util.spec_from_file_location("example_models", EXAMPLES / "example_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.example_views(count)


def expected_answer(model_folder, question: str, max_new_tokens: int, views: int = 3) -> str:
    """The greedy answer (conftest.greedy_answer: chat template + generate) about `views` of the examples' default
    views."""
    model = AutoModelForImageTextToText.from_pretrained(model_folder).eval()
    images = example_views(views)
    answer = greedy_answer(model, AutoProcessor.from_pretrained(model_folder), images, question, max_new_tokens)
    assert answer  # a reference that says nothing would not tell generating from not generating
    return answer


def printed_answer(out: str) -> str:
    """The text after "answer: " up to the next line the script prints after it (the answer may hold newlines)."""
    answer = out.split("answer: ", 1)[1]
    return answer.split("\ncamera positions:", 1)[0].strip()


def test_quickstart_converts_reconstructs_and_chats(converted_tiny, tmp_path):
    checkpoint = FIXTURE_DIR / "checkpoint"
    question = "How far is the first camera from the second one? Answer in meters."
    args = ("--official-dir", str(checkpoint), "--output", str(tmp_path / "model"), "--question", question)
    out = run_example("quickstart.py", *args, cwd=tmp_path)
    assert "camera poses (1, 3, 4, 4)" in out
    assert printed_answer(out) == expected_answer(converted_tiny, question, 24)  # the script's max_new_tokens
    assert (tmp_path / "model" / "config.json").is_file()
    assert f"converted model written to {(tmp_path / 'model').resolve()}" in out  # the user is told where it went


def test_reconstruct_to_glb(converted_tiny, tmp_path):
    """The files go into --output (run from an empty folder, so a script writing elsewhere leaves them there, not in
    the checkout), and the paths printed are theirs."""
    work, output = tmp_path / "work", tmp_path / "s"
    work.mkdir()
    out = run_example("reconstruct_to_glb.py", "--model", str(converted_tiny), "--output", str(output), cwd=work)
    printed = [(work / line).resolve() for line in out.splitlines()]  # relative paths are the script's cwd's
    assert {path.name for path in printed} >= {"scene.glb", "points.ply", "cameras.json"}
    assert all(path.is_file() and path.is_relative_to(output.resolve()) for path in printed), printed
    assert sorted(printed) == sorted(path.resolve() for path in output.rglob("*") if path.is_file())
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("name", ["spatial_chat.py", "chat_with_geometry.py"])
def test_chat_examples(name, converted_tiny, tmp_path):
    if name == "spatial_chat.py":  # the default question about one synthetic view, streamed
        out = run_example(name, "--model", str(converted_tiny), cwd=tmp_path)
        question = "How far is the red box from the blue wall? Answer in meters."
        assert out.strip() == expected_answer(converted_tiny, question, 64, views=1)  # the script's max_new_tokens
        return
    question = "Did the camera move to the left or to the right between the views?"
    out = run_example(name, "--model", str(converted_tiny), "--question", question, cwd=tmp_path)
    assert printed_answer(out) == expected_answer(converted_tiny, question, 32)  # the script's max_new_tokens


def test_finetune_lora_recipe_lowers_both_losses(converted_tiny, tmp_path):
    args = ("--model", str(converted_tiny), "--output", str(tmp_path / "lora"), "--steps", "12")
    out = run_example("finetune_lora.py", *args, cwd=tmp_path)
    curves = {
        line.split(":")[0]: [float(v) for v in line.split()[2::2]] for line in out.splitlines() if " start " in line
    }
    assert curves["lm"][1] < 0.5 * curves["lm"][0], curves
    assert curves["geometry"][1] < curves["geometry"][0], curves
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
