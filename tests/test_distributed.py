"""Data-parallel fine-tuning: two processes (torchrun, gloo, CPU) with the same global batch follow the
single-process loss curve and end with the same weights."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import geometry_block, tiny_model
from test_finetuning import HEIGHT, IMAGENET_MEAN, IMAGENET_STD, WIDTH
from g2vlm_hf.training import render_room, yaw_pose

STEPS = 4


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
    return {
        key: (rows(value, index) if isinstance(value, dict) else value[index]) for key, value in batch.items()
    }


def train(model, batch_for_step, steps: int = STEPS) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        loss = model(**batch_for_step()).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_reproduces_the_single_process_run(tmp_path):
    single = tiny_model(seed=0).train()
    batch = global_batch()
    single_losses = train(single, lambda: batch)

    output = tmp_path / "ddp.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(Path(__file__).with_name("ddp_worker.py")), str(output),
    ]  # fmt: skip
    launched = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = torch.load(output)
    # the global loss is the mean of the two ranks' losses (equal token and pixel counts per scene)
    ddp_losses = [sum(pair) / 2 for pair in zip(*result["losses"])]
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-4)
    for name, value in single.state_dict().items():
        # relative to each tensor's scale (some, like key biases, get exactly zero gradient and stay near zero)
        difference = float((result["state"][name] - value).abs().max())
        assert difference <= 1e-4 * float(value.abs().max()) + 1e-6, (name, difference)
