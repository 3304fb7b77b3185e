"""One rank of the tensor-parallel check in test_distributed.py, started by `torchrun --nproc_per_node 2`.

    tensor_parallel_worker.py MODEL_FOLDER OUTPUT_FILE

Loads the model with `distributed_config=DistributedConfig(tp_plan="auto")`, reports how each rank's shards of both
experts' projections are shaped, and (rank 0) saves the logits, a greedy generation and a reconstruction.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForImageTextToText, DistributedConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_model import chat_and_reconstruction_inputs

import g2vlm_hf  # noqa: F401


def main(folder: str, output: str) -> None:
    model = AutoModelForImageTextToText.from_pretrained(
        folder, distributed_config=DistributedConfig(tp_plan="auto"), dtype=torch.float32
    )
    layer = model.model.language_model.layers[0]
    shards = {
        name: tuple(module.weight.to_local().shape)
        for name, module in {
            "q_proj": layer.self_attn.q_proj, "geo_q_proj": layer.self_attn.geo_q_proj,
            "k_proj": layer.self_attn.k_proj, "geo_k_proj": layer.self_attn.geo_k_proj,
            "o_proj": layer.self_attn.o_proj, "geo_o_proj": layer.self_attn.geo_o_proj,
            "gate_proj": layer.mlp.gate_proj, "geo_gate_proj": layer.geo_mlp.geo_gate_proj,
            "down_proj": layer.mlp.down_proj, "geo_down_proj": layer.geo_mlp.geo_down_proj,
        }.items()
    }  # fmt: skip
    chat, recon = chat_and_reconstruction_inputs()
    with torch.no_grad():
        result = {
            "shards": shards,
            "logits": model(**chat).logits,
            "generated": model.generate(**chat, max_new_tokens=5, do_sample=False),
            "world_points": model.reconstruct(**recon).world_points,
        }
    if dist.get_rank() == 0:
        torch.save(result, output)
    del model
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
