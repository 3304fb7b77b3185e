"""One rank of the multi-process checks in test_distributed.py, started by `accelerate launch` with one of the
configs in examples/accelerate/.

    worker.py OUTPUT_DIR --steps N [--save-at K] [--resume CHECKPOINT]

Trains the tiny model on this rank's scene of the global batch with SGD + momentum, optionally saving a checkpoint
after step K or resuming from one, and (rank 0) writes every rank's losses and the full final weights to
OUTPUT_DIR/result.pt.

With the DDP config, accelerate wraps the model (MULTI_CPU over gloo on a machine without GPUs). With the FSDP config
on such a machine accelerate falls back to plain data parallelism (it only shards on accelerators), so the worker
shards the model itself with PyTorch's `fully_shard`, over the units accelerate's own FSDP2 auto-wrap policy picks
from the config, and checkpoints through torch.distributed.checkpoint as accelerate's sharded state dict does.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_distributed import global_batch, make_optimizer, rows, trainable_model


def shard_like_accelerate_fsdp2(model: torch.nn.Module) -> list[str]:
    """`fully_shard` every unit accelerate's FSDP2 auto-wrap policy selects (read from the launcher's FSDP_*
    environment), innermost first, then the root. Returns the wrapped class names."""
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    wrapped = set()
    for module in reversed(list(model.modules())):
        if module is not model and policy(module):
            wrapped.add(type(module).__name__)
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return sorted(wrapped)


def run(args: argparse.Namespace, accelerator: Accelerator) -> None:
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"

    model = trainable_model()
    wrapped = shard_like_accelerate_fsdp2(model) if fsdp else []
    optimizer = make_optimizer(model)
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)

    start = 0
    if args.resume is not None:
        start = int((args.resume / "step.txt").read_text())
        if fsdp:
            state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
            dcp.load(state, checkpoint_id=str(args.resume))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:
            accelerator.load_state(str(args.resume))

    shard = rows(global_batch(), slice(accelerator.process_index, accelerator.process_index + 1))
    losses = []
    for step in range(start, args.steps):
        loss = model(**shard).loss
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        losses.append(loss.item())
        if args.save_at == step + 1:
            checkpoint = args.output / "checkpoint"
            if fsdp:
                model_state, optimizer_state = get_state_dict(model, optimizer)
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint))
            else:
                accelerator.save_state(str(checkpoint))
            if accelerator.is_main_process:
                (checkpoint / "step.txt").write_text(str(step + 1))
            accelerator.wait_for_everyone()

    gathered = [None] * accelerator.num_processes
    dist.all_gather_object(gathered, losses)
    if fsdp:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.unwrap_model(model).state_dict()
    if accelerator.is_main_process:
        torch.save({"losses": gathered, "state": state, "wrapped": wrapped, "start": start}, args.output / "result.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume", type=Path)
    args = parser.parse_args()

    # every trainable parameter takes part: no `find_unused_parameters`; a stuck collective fails instead of hanging
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=90))])
    assert accelerator.num_processes == 2 and accelerator.distributed_type == DistributedType.MULTI_CPU
    torch.set_num_threads(1)
    run(args, accelerator)
    # both ranks done before either closes its gloo connections: a rank still in a collective whose peer has closed
    # aborts in gloo's I/O thread (SIGABRT, seen once in CI)
    accelerator.wait_for_everyone()
    # only once the wrapped model is gone: a DDP model outliving its process group can hang at exit
    accelerator.end_training()


if __name__ == "__main__":
    main()
