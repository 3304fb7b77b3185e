"""Checks that `accelerate launch` can start two gloo processes here: each rank adds its rank to an all-reduce."""

from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator, InitProcessGroupKwargs

accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
total = torch.tensor(float(accelerator.process_index))
dist.all_reduce(total)
print(
    f"rank {accelerator.process_index} of {accelerator.num_processes}: {accelerator.distributed_type.value} sum {total.item():g}"
)
accelerator.end_training()  # destroys the process group: gloo may abort at exit otherwise
