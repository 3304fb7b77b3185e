"""Fine-tune G²VLM with LoRA on both experts, with the language loss on spatial answers AND the reconstruction loss
on views with known geometry, using transformers' Trainer.

The data is generated: a textured box room rendered from random cameras (exact world points and poses), and spatial
questions whose answers follow from those cameras. With no arguments (or --tiny) it trains a small random model made
locally (examples/example_models.py) for a few steps on the CPU; pass --model (a converted folder or Hub id) and larger
--width/--steps for a real run. The losses are reported before and after on two held-out scenes.

    python examples/finetune_lora.py [--tiny | --model outputs/g2vlm-2b] [--steps 20] [--output outputs/lora]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from example_models import TINY_DIR, add_model_arguments, model_folder
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

import g2vlm_hf  # noqa: F401
from g2vlm_hf.training import lora_target_modules, render_room, spatial_questions, trainable_report, yaw_pose


def make_dataset(num_scenes: int, views: int, height: int, width: int, seed: int = 0) -> list[dict]:
    """Scenes of the synthetic room: images, true geometry, and one spatial question with its answer each."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(num_scenes):
        poses = np.stack(
            [yaw_pose(0.0, 0.0, 0.0)]
            + [yaw_pose(rng.uniform(-1, 1), rng.uniform(-0.5, 0.5), rng.uniform(-20, 20)) for _ in range(views - 1)]
        )
        scene = render_room(poses, height, width)
        question, answer = spatial_questions(scene)[int(rng.integers(2))]
        examples.append({"scene": scene, "question": question, "answer": answer})
    return examples


class Collator:
    """Chat prompts with the views, labels on the assistant answers, and the views' true geometry."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list[dict]) -> dict:
        conversations = []
        for example in examples:
            images = [{"type": "image", "image": Image.fromarray(image)} for image in example["scene"].images]
            conversations.append(
                [
                    {"role": "user", "content": [*images, {"type": "text", "text": example["question"]}]},
                    {"role": "assistant", "content": example["answer"]},
                ]
            )
        batch = self.processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors="pt"
        ).data
        batch["labels"] = self.processor.assistant_labels(batch["input_ids"])
        batch["geometry_targets"] = {
            "world_points": torch.from_numpy(np.stack([e["scene"].world_points for e in examples])),
            "valid_mask": torch.from_numpy(np.stack([e["scene"].valid_mask for e in examples])),
            "camera_poses": torch.from_numpy(np.stack([e["scene"].camera_poses for e in examples])),
        }
        return batch


@torch.no_grad()
def evaluate(model, batch: dict) -> dict[str, float]:
    """The total, language and geometry losses on a fixed batch."""
    model.eval()
    with torch.no_grad():
        outputs = model(**batch)
    return {
        "loss": outputs.loss.item(),
        "lm": outputs.lm_loss.item(),
        "geometry": outputs.geometry_losses["total"].item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default=str(TINY_DIR))
    parser.add_argument("--output", type=Path, default=Path("outputs/lora"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--width", type=int, default=56, help="geometry image width (a multiple of 14)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    args = parser.parse_args()

    training_args = TrainingArguments(
        output_dir=str(args.output), max_steps=args.steps, per_device_train_batch_size=2,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", logging_steps=5, save_strategy="no",
        report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), seed=0,
    )  # fmt: skip
    # under `accelerate launch` one process makes the tiny model while the others wait
    with training_args.main_process_first(desc="making the tiny model"):
        args.tiny = args.tiny or args.model == str(TINY_DIR)
        folder = model_folder(args)
    processor = AutoProcessor.from_pretrained(folder)
    processor.geometry_image_processor.target_width = args.width  # render at the geometry resolution: no resize
    processor.semantic_image_size = args.width
    height = args.width * 3 // 4 // 14 * 14

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    # LoRA on the attention and MLP projections of both experts
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_modules(semantic=True, geometry=True))
    model = get_peft_model(model, lora)
    if training_args.process_index == 0:
        print(trainable_report(model))

    scenes = make_dataset(args.scenes + 2, args.views, height, args.width)
    dataset, held_out = scenes[:-2], scenes[-2:]
    collator = Collator(processor)
    held_out_batch = collator(held_out)
    before = evaluate(model, held_out_batch)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
    )
    trainer.train()
    trainer.save_model(str(args.output))
    after = evaluate(model, held_out_batch)
    if trainer.is_world_process_zero():
        print(f"processes: {training_args.world_size}")
        for name in ("loss", "lm", "geometry"):
            print(f"{name}: start {before[name]:.4f} end {after[name]:.4f}")
        print(f"adapter saved to {args.output}")


if __name__ == "__main__":
    main()
