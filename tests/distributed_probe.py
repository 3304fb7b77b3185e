"""Checks that `accelerate launch` can start two gloo processes here: each rank adds its rank to an all-reduce."""

import torch
import torch.distributed as dist
from accelerate import Accelerator

accelerator = Accelerator()
total = torch.tensor(float(accelerator.process_index))
dist.all_reduce(total)
print(f"rank {accelerator.process_index} of {accelerator.num_processes}: {accelerator.distributed_type.value} sum {total.item():g}")
accelerator.end_training()  # destroys the process group: gloo may abort at exit otherwise
