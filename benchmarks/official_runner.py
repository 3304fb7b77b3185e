"""Time the OFFICIAL G²VLM inference (GitHub InternRobotics/G2VLM) on the CPU: reconstruction and decoding.

Runs inside the official harness environment (torch 2.14.1 + torchvision + transformers 4.49, see
../shared/tools/official-harness/README.md), imports the official tree given by --ref-dir (never copied), with the
harness's CPU stand-in for flash_attn, in float32 (the official bfloat16 casts made float32, autocast off, as the
harness's fp32 fixture does). Prints one JSON object; with --record, also saves the inputs of each inference phase
and the outputs of the first reconstruction and chat (world points, first decode logits) for the parity check. Called
by bench_vs_official.py; not part of the tests.
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


PHASE_KEYS = ("packed_text_ids", "packed_text_indexes", "packed_seqlens", "packed_vit_token_indexes",
              "packed_dino_token_indexes", "packed_image_grid_thw", "packed_vit_images", "packed_dino_images")  # fmt: skip


class Recorder:
    """Records the inputs of each official inference phase and the first logits of decoding, for the parity check
    (the same records as the harness's make_fixture.py)."""

    def __init__(self, torch, model):
        self.torch, self.tensors, self.prefix, self.phase = torch, {}, None, 0
        for name in ("forward_cache_update_text", "forward_cache_update_vit", "forward_cache_update_dino"):
            setattr(model, name, self.wrap(getattr(model, name)))
        model.language_model.lm_head.register_forward_hook(self.logits_hook)

    def start(self, prefix):
        self.prefix, self.phase = prefix, 0

    def wrap(self, method):
        def recorded(*args, **kwargs):
            if self.prefix is not None:
                for key in PHASE_KEYS:
                    if self.torch.is_tensor(kwargs.get(key)):
                        self.tensors[f"{self.prefix}.phase{self.phase}.{key}"] = kwargs[key].detach().clone()
                self.phase += 1
            return method(*args, **kwargs)

        return recorded

    def logits_hook(self, module, inputs, output):
        if self.prefix == "chat" and "chat.first_logits" not in self.tensors:
            self.tensors["chat.first_logits"] = output.detach().float().clone()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref-dir", required=True)
    parser.add_argument("--shim", required=True)
    parser.add_argument("--checkpoint", required=True, help="official-layout checkpoint folder")
    parser.add_argument("--views", required=True, help="JSON list of lists of image paths (one list per case)")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--record", help="safetensors file for the inputs and outputs of the first reconstruction "
                        "and the chat (parity check)")  # fmt: skip
    args = parser.parse_args()
    torch, model, tokenizer, token_ids, dino_transform = load_official(args.ref_dir, args.shim, args.checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    recorder = Recorder(torch, model) if args.record else None
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the whole run) the official code prints progress; keep stdout for the JSON result
    results = {"recon": []}
    with torch.no_grad():
        for case, paths in enumerate(json.loads(args.views)):
            times = []
            for repeat in range(args.repeats):
                if recorder is not None:
                    recorder.start("recon" if case == 0 and repeat == 0 else None)
                start = time.perf_counter()
                prediction = model.recon(tokenizer, dict(token_ids), dino_transform, list(paths))
                times.append(time.perf_counter() - start)
                if recorder is not None and case == 0 and repeat == 0:
                    recorder.tensors["recon.world_points"] = prediction["points"].float().clone()
            results["recon"].append({"views": len(paths), "seconds": min(times)})

        # decoding: time the official generate_text loop inside chat_with_recon
        from PIL import Image

        decode_times = []
        original = model.generate_text

        def timed(*a, **kw):
            if recorder is not None:
                recorder.tensors.setdefault("chat.start_tokens", kw["packed_start_tokens"].clone())
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
        for repeat in range(args.repeats):
            if recorder is not None:
                recorder.start("chat" if repeat == 0 else None)
            model.chat_with_recon(tokenizer, dict(token_ids), QwenVL2ImageTransform(768, 768, 14), dino_transform,
                                  images=[image], prompt="How far is the red box?", max_length=args.decode_steps)  # fmt: skip
        seconds, steps = min(decode_times)
        results["decode"] = {"steps": steps, "seconds": seconds, "tokens_per_second": steps / seconds}
    if recorder is not None:
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in recorder.tensors.items()}, args.record)
    sys.stdout = sys.__stdout__
    print(json.dumps(results))


if __name__ == "__main__":
    main()
