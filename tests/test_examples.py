"""The example scripts run offline on the converted tiny fixture (each in its own process, as a user runs them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FIXTURE_DIR, REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def run_example(name: str, *args: str, cwd) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_quickstart_converts_reconstructs_and_chats(tmp_path):
    checkpoint = FIXTURE_DIR / "checkpoint"
    out = run_example("quickstart.py", "--official-dir", str(checkpoint), "--output", str(tmp_path / "model"), cwd=tmp_path)
    assert "camera poses (1, 3, 4, 4)" in out and "answer:" in out
    assert (tmp_path / "model" / "config.json").is_file()
    assert f"converted model written to {(tmp_path / 'model').resolve()}" in out  # the user is told where it went


def test_reconstruct_to_glb(converted_tiny, tmp_path):
    out = run_example("reconstruct_to_glb.py", "--model", str(converted_tiny), "--output", str(tmp_path / "s"), cwd=tmp_path)
    assert {line.rsplit("/", 1)[-1] for line in out.split()} >= {"scene.glb", "points.ply", "cameras.json"}


@pytest.mark.parametrize("name", ["spatial_chat.py", "chat_with_geometry.py"])
def test_chat_examples(name, converted_tiny, tmp_path):
    out = run_example(name, "--model", str(converted_tiny), cwd=tmp_path)
    assert out.strip()


def test_finetune_lora_recipe_lowers_both_losses(converted_tiny, tmp_path):
    args = ("--model", str(converted_tiny), "--output", str(tmp_path / "lora"), "--steps", "12")
    out = run_example("finetune_lora.py", *args, cwd=tmp_path)
    curves = {line.split(":")[0]: [float(v) for v in line.split()[2::2]] for line in out.splitlines() if " start " in line}
    assert curves["lm"][1] < 0.5 * curves["lm"][0], curves
    assert curves["geometry"][1] < curves["geometry"][0], curves
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
