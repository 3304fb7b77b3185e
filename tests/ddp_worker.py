"""One rank of the data-parallel check in test_distributed.py, launched with `torchrun --nproc_per_node 2`."""

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_model  # noqa: E402
from test_distributed import global_batch, rows, train  # noqa: E402


def main(output: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_model(seed=0).train()
    # the semantic encoder gets no image in this batch: its parameters take no part in the loss
    replica = DistributedDataParallel(model, find_unused_parameters=True)
    shard = rows(global_batch(), slice(rank, rank + 1))
    local = train(replica, lambda: shard)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    if rank == 0:
        torch.save({"losses": gathered, "state": model.state_dict()}, output)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
