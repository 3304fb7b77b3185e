"""Several processes on the CPU, over gloo, started with the commands of the README's "Scaling out" section:

- fine-tuning under `accelerate launch` with the configs in examples/accelerate/: two processes follow the
  single-process loss curve and end with the same weights, under DDP and FSDP2, straight through and resumed from a
  checkpoint; the fine-tuning example runs unchanged;
- tensor parallelism under `torchrun`: both experts sharded over two processes give the unsharded outputs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import geometry_block, tiny_model
from fixture_paths import REPO_ROOT
from test_finetuning import HEIGHT, IMAGENET_MEAN, IMAGENET_STD, WIDTH
from test_model import chat_and_reconstruction_inputs

from g2vlm_hf.training import render_room, yaw_pose

STEPS = 4
TESTS = Path(__file__).resolve().parent
CONFIGS = REPO_ROOT / "examples" / "accelerate"
# On a machine without GPUs: accelerate runs the processes on the CPU over gloo, pinned to the loopback interface so
# that gloo needs no lookup of the machine's hostname.
CPU_ENVIRONMENT = {"ACCELERATE_USE_CPU": "true", "GLOO_SOCKET_IFNAME": "lo"}
LAUNCH_TIMEOUT_S = 150


def global_batch() -> dict:
    """Two scenes of two views each, with identical token layouts, labels on the last tokens and true geometry."""
    scenes = [
        render_room(np.stack([yaw_pose(0.0, 0.0, 0.0), yaw_pose(shift, 0.2, angle)]), HEIGHT, WIDTH)
        for shift, angle in ((0.5, -10.0), (-0.6, 14.0))
    ]
    pixels = torch.stack([torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255.0 for s in scenes])
    ids = torch.tensor([[1, 5, *geometry_block(2, 2, 3), 8, 9, 10], [1, 6, *geometry_block(2, 2, 3), 11, 12, 13]])
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return dict(
        input_ids=ids,
        labels=labels,
        geometry_pixel_values=(pixels - IMAGENET_MEAN) / IMAGENET_STD,
        geometry_targets={
            "world_points": torch.from_numpy(np.stack([s.world_points for s in scenes])),
            "valid_mask": torch.from_numpy(np.stack([s.valid_mask for s in scenes])),
            "camera_poses": torch.from_numpy(np.stack([s.camera_poses for s in scenes])),
        },
    )


def rows(batch: dict, index: slice) -> dict:
    return {key: (rows(value, index) if isinstance(value, dict) else value[index]) for key, value in batch.items()}


def trainable_model() -> torch.nn.Module:
    """The tiny model with its semantic encoder frozen: this batch has no semantic image."""
    model = tiny_model(seed=0).train()
    model.model.visual.requires_grad_(False)
    return model


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # momentum gives the optimizer a state that a resumed run must restore to stay on the curve
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def single_process_run() -> tuple[list[float], dict, dict]:
    """The loss curve over the global batch, the initial weights and the final weights."""
    model = trainable_model()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = make_optimizer(model)
    batch = global_batch()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, initial, model.state_dict()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs a launcher command with the CPU environment; a launch that outlives LAUNCH_TIMEOUT_S is stopped."""
    # output to files, not pipes: a rank that outlives its launcher must not keep the test waiting on a pipe
    with (cwd / "launch.out").open("w+") as stdout, (cwd / "launch.err").open("w+") as stderr:
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **CPU_ENVIRONMENT}, stdout=stdout, stderr=stderr, text=True
        )
        try:
            process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()  # the launcher stops its ranks on SIGTERM
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            stderr.write(f"\n[stopped after {LAUNCH_TIMEOUT_S} s]\n")
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read())


def accelerate_launch(config: str, script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file examples/accelerate/CONFIG` with two CPU processes, as in the README."""
    command = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(CONFIGS / config),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    return launch(command, cwd)


def torchrun(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` on the CPU, as in the README."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    return launch(command, cwd)


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory) -> None:
    """Skips the multi-process tests where this machine cannot start two gloo processes at all (the launcher's
    own output says why); everything past that point is tested."""
    probe = accelerate_launch("ddp.yaml", TESTS / "distributed_probe.py", cwd=tmp_path_factory.mktemp("probe"))
    if probe.returncode != 0 or probe.stdout.count("MULTI_CPU sum 1") != 2:
        pytest.skip(
            f"accelerate could not start two gloo processes here:\n{probe.stdout[-1500:]}{probe.stderr[-3000:]}"
        )


def failure_report(launched: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines and any native abort's message (the launcher prints its summary after them), then
    the end of the output."""
    native = ("terminate called", "what():", "Fatal Python error", "gloo")
    rank_lines = [
        line for line in launched.stderr.splitlines() if line.startswith("[rank") or any(n in line for n in native)
    ]
    return "\n".join(rank_lines[-40:]) + "\n...\n" + launched.stderr[-2000:]


def run_worker(config: str, output: Path, *args: str) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    launched = accelerate_launch(
        config, TESTS / "distributed_worker.py", str(output), "--steps", str(STEPS), *args, cwd=output
    )
    assert launched.returncode == 0, failure_report(launched)
    return torch.load(output / "result.pt")


def assert_same_run(result: dict, single: tuple[list[float], dict, dict]) -> None:
    single_losses, initial, final = single
    # the global loss is the mean of the two ranks' losses (equal token and pixel counts per scene)
    losses = [sum(pair) / 2 for pair in zip(*result["losses"])]
    np.testing.assert_allclose(losses, single_losses[result["start"] :], rtol=1e-4)
    assert result["state"].keys() == final.keys()
    # the same training: every tensor moved as in the single run, up to float noise relative to how far it moved
    # (a few ulps for tensors that barely moved)
    mismatch = moved = 0.0
    for name, value in final.items():
        step = value - initial[name]
        difference = float((result["state"][name] - value).abs().max())
        assert difference <= 1e-2 * float(step.abs().max()) + 1e-6 * float(value.abs().max()) + 1e-9, (name, difference)
        mismatch += float((result["state"][name] - value).pow(2).sum())
        moved += float(step.pow(2).sum())
    assert (mismatch / moved) ** 0.5 < 1e-4


@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_two_processes_reproduce_the_single_process_run_and_resume_on_it(two_processes, config, tmp_path):
    single = single_process_run()

    straight = run_worker(config, tmp_path / "straight", "--save-at", "2")
    assert_same_run(straight, single)

    resumed = run_worker(config, tmp_path / "resumed", "--resume", str(tmp_path / "straight" / "checkpoint"))
    assert resumed["start"] == 2
    assert_same_run(resumed, single)

    if config == "fsdp.yaml":
        # accelerate's auto-wrap makes one FSDP unit of each class `_no_split_modules` names: decoder layers (both
        # experts and their one attention), encoder blocks and head blocks
        assert set(straight["wrapped"]) == set(tiny_model()._no_split_modules)
        assert "G2VLMDecoderLayer" in straight["wrapped"]


def test_the_finetuning_recipe_runs_unchanged_under_accelerate(two_processes, converted_tiny, tmp_path):
    launched = accelerate_launch(
        "ddp.yaml", REPO_ROOT / "examples" / "finetune_lora.py", "--model", str(converted_tiny), "--steps", "2",
        "--output", str(tmp_path / "lora"), cwd=tmp_path,
    )  # fmt: skip
    assert launched.returncode == 0, failure_report(launched)
    assert "processes: 2" in launched.stdout
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_tensor_parallel_plan_shards_both_experts_over_two_processes(two_processes, tmp_path):
    model = tiny_model(seed=7)
    model.save_pretrained(tmp_path / "model")
    launched = torchrun(
        TESTS / "tensor_parallel_worker.py", str(tmp_path / "model"), str(tmp_path / "tp.pt"), cwd=tmp_path
    )
    assert launched.returncode == 0, failure_report(launched)
    result = torch.load(tmp_path / "tp.pt")

    text = model.config.text_config
    hidden, head_dim = text.hidden_size, text.hidden_size // text.num_attention_heads
    half_heads, half_kv, half_mlp = (
        text.num_attention_heads // 2,
        text.num_key_value_heads // 2,
        text.intermediate_size // 2,
    )
    for prefix in ("", "geo_"):  # both experts: heads and MLP columns split in two, inputs of the output layers too
        assert result["shards"][f"{prefix}q_proj"] == (half_heads * head_dim, hidden)
        assert result["shards"][f"{prefix}k_proj"] == (half_kv * head_dim, hidden)
        assert result["shards"][f"{prefix}o_proj"] == (hidden, half_heads * head_dim)
        assert result["shards"][f"{prefix}gate_proj"] == (half_mlp, hidden)
        assert result["shards"][f"{prefix}down_proj"] == (hidden, half_mlp)

    chat, recon = chat_and_reconstruction_inputs()
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(**chat).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(result["generated"], model.generate(**chat, max_new_tokens=5, do_sample=False))
        torch.testing.assert_close(
            result["world_points"], model.reconstruct(**recon).world_points, rtol=1e-5, atol=1e-5
        )
