"""Time the OFFICIAL G²VLM inference (GitHub InternRobotics/G2VLM) on the CPU: reconstruction and decoding.

Runs inside the official harness environment (torch 2.14.1 + torchvision + transformers 4.49, see
../shared/tools/official-harness/README.md), imports the official tree given by --ref-dir (never copied), with the
harness's CPU stand-in for flash_attn, in float32 (the official bfloat16 casts made float32, autocast off, as the
harness's fp32 fixture does). Prints one JSON object. Called by bench_vs_official.py; not part of the tests.
"""

import argparse
import json
import os
import sys
import time
import types


def load_official(ref: str, shim: str, checkpoint: str):
    sys.path[:0] = [shim, ref, os.path.join(ref, "modeling")]
    os.chdir(ref)
    import torch

    autocast = torch.amp.autocast
    torch.amp.autocast = lambda *a, **kw: autocast("cpu", enabled=False)
    torch.cuda.amp.autocast = lambda *a, **kw: autocast("cpu", enabled=False)

    import flash_attn
    import modeling.g2vlm.dinov2_model
    import modeling.g2vlm.g2vlm
    import modeling.g2vlm.qwen2vl
    import modeling.qwen2vl.modeling_qwen2_vl as official_qwen2vl
    import pi3.models.layers.attention
    from modeling.g2vlm import (
        G2VLM,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        G2VLMConfig,
        Qwen2VLConfig,
        Qwen2VLForCausalLM,
    )
    from modeling.qwen2vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from modeling.qwen2vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    official_qwen2vl.flash_attn_varlen_func = flash_attn.flash_attn_varlen_func
    # float32 run: the official modules' explicit bfloat16 casts become float32 (as the harness's fp32 fixture)
    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.bfloat16 = torch.float32
    for module in (modeling.g2vlm.qwen2vl, modeling.g2vlm.dinov2_model, modeling.g2vlm.g2vlm,
                   pi3.models.layers.attention, official_qwen2vl):  # fmt: skip
        module.torch = proxy

    from data.data_utils import add_special_tokens
    from data.transforms_vggt import DinoImageNormalizeTransform
    from safetensors import safe_open
    from transformers import PreTrainedTokenizerFast

    llm_config = Qwen2VLConfig.from_json_file(os.path.join(checkpoint, "text_config.json"))
    llm_config.qk_norm, llm_config.tie_word_embeddings = True, False
    llm_config.layer_module = "Qwen2VLMoTDecoderLayer"
    vit_config = Qwen2VLVisionConfig.from_json_file(os.path.join(checkpoint, "vit_config.json"))
    vit_config.patch_size = 14
    dino_config = Dinov2WithRegistersConfig.from_json_file(os.path.join(checkpoint, "dino_config.json"))
    config = G2VLMConfig(visual_und=True, visual_recon=True, llm_config=llm_config, vit_config=vit_config,
                         dino_config=dino_config, vit_max_num_patch_per_side=36)  # fmt: skip
    model = G2VLM(Qwen2VLForCausalLM(llm_config), Qwen2VisionTransformerPretrainedModel(vit_config),
                  Dinov2WithRegistersModel(dino_config), config)  # fmt: skip
    # one tensor at a time into the float32 model, so that a full-size checkpoint never sits in memory twice
    state = model.state_dict()
    with safe_open(os.path.join(checkpoint, "model.safetensors"), framework="pt") as weights:
        assert set(weights.keys()) == set(state), set(weights.keys()) ^ set(state)
        with torch.no_grad():
            for key in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
                state[key].copy_(weights.get_tensor(key))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    tokenizer, token_ids, _ = add_special_tokens(tokenizer)
    return torch, model.eval(), tokenizer, token_ids, DinoImageNormalizeTransform(target_size=518)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--shim", required=True)
    parser.add_argument("--checkpoint", required=True, help="official-layout checkpoint folder")
    parser.add_argument("--views", required=True, help="JSON list of lists of image paths (one list per case)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    torch, model, tokenizer, token_ids, dino_transform = load_official(args.ref_dir, args.shim, args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the whole run) the official code prints progress; keep stdout for the JSON result
    results = {"recon": []}
    with torch.no_grad():
        for paths in json.loads(args.views):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.recon(tokenizer, dict(token_ids), dino_transform, list(paths))
                times.append(time.perf_counter() - start)
            results["recon"].append({"views": len(paths), "seconds": min(times)})

        # decoding: time the official generate_text loop inside chat_with_recon
        from PIL import Image

        decode_times = []
        original = model.generate_text

        def timed(*a, **kw):
            start = time.perf_counter()
            out = original(*a, **kw)
            decode_times.append((time.perf_counter() - start, out.shape[0]))
            return out

        model.generate_text = timed
        import data.transforms as official_transforms
        from data.transforms import QwenVL2ImageTransform
        from modeling.qwen2vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                          temporal_patch_size=2)  # fmt: skip
        official_transforms.Qwen2VLImageProcessor.from_pretrained = classmethod(lambda cls, *a, **k: processor)
        image = Image.open(json.loads(args.views)[0][0]).convert("RGB")
        for _ in range(args.repeats):
            model.chat_with_recon(tokenizer, dict(token_ids), QwenVL2ImageTransform(768, 768, 14), dino_transform,
                                  images=[image], prompt="How far is the red box?", max_length=args.decode_steps)  # fmt: skip
        seconds, steps = min(decode_times)
        results["decode"] = {"steps": steps, "seconds": seconds, "tokens_per_second": steps / seconds}
    sys.stdout = sys.__stdout__
    print(json.dumps(results))


if __name__ == "__main__":
    main()
