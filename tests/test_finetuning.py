"""Fine-tuning: language and geometry losses, expert freezing, LoRA per expert, gradient checkpointing."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import geometry_block, image_block, image_patches, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.modeling_layers import GradientCheckpointingLayer

from g2vlm_hf.modeling.geometry_losses import geometry_losses, transform_points
from g2vlm_hf.modeling.parts import part_of
from g2vlm_hf.training import (
    freeze_for_stage,
    lora_target_modules,
    parameter_group,
    render_room,
    set_trainable,
    trainable_report,
    yaw_pose,
)
from g2vlm_hf.training.experts import LORA_RECIPES

GRID_H, GRID_W = 2, 3
HEIGHT, WIDTH = GRID_H * 14, GRID_W * 14
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def synthetic_batch() -> dict:
    """Two views of the synthetic room with their true geometry, a question and its answer as labels."""
    poses = np.stack([yaw_pose(0.0, 0.0, 0.0), yaw_pose(0.6, 0.3, -12.0)])
    scene = render_room(poses, HEIGHT, WIDTH)
    pixels = torch.from_numpy(scene.images).permute(0, 3, 1, 2).float() / 255.0
    pixels = ((pixels - IMAGENET_MEAN) / IMAGENET_STD)[None]
    patches, grid = image_patches(4, 4)
    ids = torch.tensor([[1, 5, *geometry_block(2, GRID_H, GRID_W), *image_block(4, 4), 8, 9, 10, 11, 12, 13]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    targets = {
        "world_points": torch.from_numpy(scene.world_points)[None],
        "valid_mask": torch.from_numpy(scene.valid_mask)[None],
        "camera_poses": torch.from_numpy(scene.camera_poses)[None],
    }
    return dict(
        input_ids=ids, labels=labels, pixel_values=patches, image_grid_thw=grid, geometry_pixel_values=pixels,
        geometry_targets=targets,
    )  # fmt: skip


def train(model, batch, loss_name: str, steps: int = 12, lr: float = 2e-3) -> list[float]:
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        outputs = model(**batch)
        loss = {"lm": outputs.lm_loss, "geometry": outputs.geometry_losses and outputs.geometry_losses["total"]}.get(
            loss_name, outputs.loss
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def test_language_loss_goes_down():
    batch = synthetic_batch()
    batch.pop("geometry_targets")
    history = train(tiny_model(), batch, "lm")
    assert history[-1] < 0.5 * history[0], history


def test_geometry_loss_goes_down():
    batch = synthetic_batch()
    batch.pop("labels")
    history = train(tiny_model(), batch, "geometry")
    assert history[-1] < 0.7 * history[0], history


def test_both_losses_go_down_together():
    model = tiny_model()
    history = train(model, synthetic_batch(), "total")
    assert history[-1] < 0.6 * history[0], history
    with torch.no_grad():
        outputs = model(**synthetic_batch())
    torch.testing.assert_close(outputs.loss, outputs.lm_loss + outputs.geometry_losses["total"])


def test_geometry_loss_vanishes_for_a_prediction_equal_to_the_truth_up_to_similarity():
    """The loss is invariant to the world frame and scale: a prediction that is the truth moved by a rotation,
    a translation and a scale must cost (almost) nothing."""
    batch = synthetic_batch()["geometry_targets"]
    world, poses = batch["world_points"].double(), batch["camera_poses"].double()
    local = transform_points(torch.linalg.inv(poses), world)
    angle = torch.tensor(0.7, dtype=torch.float64)
    similarity = torch.eye(4, dtype=torch.float64)
    similarity[:3, :3] = torch.tensor(
        [[torch.cos(angle), -torch.sin(angle), 0], [torch.sin(angle), torch.cos(angle), 0], [0, 0, 1]]
    )
    similarity[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    moved = similarity @ poses
    prediction = {
        "local_points": 3.0 * local,
        "camera_poses": torch.cat(
            [torch.cat([moved[..., :3, :3], 3.0 * moved[..., :3, 3:]], -1), moved[..., 3:, :]], -2
        ),
        "global_points": 3.0 * transform_points(torch.linalg.inv(poses[:, :1]).expand_as(poses), world),
    }
    losses = geometry_losses(prediction, world, batch["valid_mask"], poses)
    # the rotation angle is acos of a cosine clamped to 1 - 1e-6 (as officially), so its floor is acos(1 - 1e-6)
    floor = math.acos(1 - 1e-6)
    floors = {"camera_rotation": floor, "camera": floor, "total": 0.2 * floor}
    for name, value in losses.items():
        assert value.item() < floors.get(name, 0.0) + 1e-4, (name, value.item())
    wrong = {**prediction, "local_points": local.flip(-2)}
    assert geometry_losses(wrong, world, batch["valid_mask"], poses)["local_points"] > 1e-2


def expected_groups_trainable(model, groups):
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (parameter_group(name) in groups), name


def test_one_group_may_be_named_alone_and_unknown_ones_are_refused():
    model = tiny_model()
    report = set_trainable(model, "geometry_expert")  # a string was read as its letters
    expected_groups_trainable(model, {"geometry_expert"})
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    with pytest.raises(ValueError, match=r"Unknown parameter group\(s\) \['geometry'\]"):
        set_trainable(model, ["geometry"])


@pytest.mark.parametrize("stage", [1, 2])
def test_freezing_stages_let_gradients_reach_exactly_the_intended_parameters(stage):
    model = tiny_model()
    report = freeze_for_stage(model, stage)
    groups = {1: {"geometry_expert", "geometry_projector", "geometry_heads"}}.get(
        stage, {"semantic_expert", "geometry_expert", "geometry_projector", "geometry_heads"}
    )
    expected_groups_trainable(model, groups)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.per_group["semantic_encoder"][0] == 0 and report.per_group["embeddings"][0] == 0
    model(**synthetic_batch()).loss.backward()
    reached = dict.fromkeys(groups, 0.0)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name
            reached[parameter_group(name)] += float(parameter.grad.abs().sum())
        else:
            assert parameter.grad is None, name
    # every trainable part learns (single tensors may get exactly zero, e.g. the camera translation bias, which
    # the relative-pose loss cannot see)
    assert all(total > 0 for total in reached.values()), reached


def test_parameter_groups_cover_every_weight_and_know_the_experts():
    model = tiny_model()
    groups = {parameter_group(name) for name, _ in model.named_parameters()}
    assert groups == {
        "semantic_expert", "geometry_expert", "embeddings", "semantic_encoder", "geometry_encoder",
        "geometry_projector", "geometry_heads",
    }  # fmt: skip
    assert parameter_group("model.language_model.layers.3.self_attn.geo_q_proj.weight") == "geometry_expert"
    assert parameter_group("model.language_model.layers.3.geo_attn_layer_scale.gamma") == "geometry_expert"
    assert parameter_group("model.language_model.layers.3.self_attn.q_proj.weight") == "semantic_expert"


def adapted_modules(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}


LAYERS = range(2)


@pytest.mark.parametrize(
    "target_modules, expected",
    [
        (
            ["q_proj", "k_proj", "v_proj", "o_proj"],
            {f"layers.{i}.self_attn.{p}_proj" for i in LAYERS for p in "qkvo"},
        ),
        (
            lora_target_modules(semantic=False, geometry=True),
            {f"layers.{i}.self_attn.geo_{p}_proj" for i in LAYERS for p in "qkvo"}
            | {f"layers.{i}.geo_mlp.geo_{p}_proj" for i in LAYERS for p in ("gate", "up", "down")},
        ),
        (
            lora_target_modules(semantic=True, geometry=True, mlp=False),
            {f"layers.{i}.self_attn.{g}{p}_proj" for i in LAYERS for p in "qkvo" for g in ("", "geo_")},
        ),
        (
            lora_target_modules(semantic=False, semantic_encoder=True, geometry_encoder=True),
            {"visual.blocks.0.attn.qkv", "visual.blocks.0.attn.proj"}
            | {
                f"geometry_encoder.encoder.layer.{i}.attention.{p}"
                for i in LAYERS
                for p in ("query", "key", "value", "dense")
            },
        ),
    ],
)
def test_lora_recipes_adapt_exactly_the_intended_modules(target_modules, expected):
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=target_modules))
    prefix = re.compile(r"^base_model\.model\.(model\.)?(language_model\.)?")
    adapted = {prefix.sub("", name) for name in adapted_modules(peft_model)}
    assert adapted == expected
    peft_model(**synthetic_batch()).loss.backward()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if p.requires_grad)


def test_lora_adapter_save_load_and_merge(tmp_path):
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=lora_target_modules(geometry=True)))
    train(peft_model, synthetic_batch(), "total", steps=3)  # move the adapters away from their zero init
    peft_model.eval()
    batch = synthetic_batch()
    with torch.no_grad():
        expected = peft_model(**batch)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    with torch.no_grad():
        reloaded = loaded(**batch)
        merged = loaded.merge_and_unload()(**batch)
        plain = tiny_model()(**batch)
    torch.testing.assert_close(reloaded.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(merged.logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged.geometry_losses["total"], expected.geometry_losses["total"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain.logits, expected.logits)  # the adapters did change the model


def block_calls(model: torch.nn.Module, run) -> tuple[dict[str, int], object]:
    """`run()`'s result and a live count, per kind of checkpointable block, of the calls of one such block's first
    linear: transformers checkpoints a block's `forward`, so the block's own hooks fire once even when it is
    recomputed, its leaves' hooks twice."""
    blocks = {type(m).__name__: m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    counts = dict.fromkeys(blocks, 0)

    def counter(kind: str):
        def hook(*_):
            counts[kind] += 1

        return hook

    for kind, block in blocks.items():
        next(m for m in block.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(counter(kind))
    return counts, run()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = synthetic_batch()
    reference, checkpointed = tiny_model(seed=3), tiny_model(seed=3)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in checkpointed.modules() if getattr(m, "gradient_checkpointing", False)]
    kinds = {type(m).__name__ for m in layers}
    assert {
        "G2VLMDecoderLayer",
        "Qwen2VLVisionBlock",
        "Dinov2WithRegistersLayer",
        "G2VLMHeadBlock",
        "G2VLMHeadCrossBlock",
    } <= kinds
    losses, calls = [], []
    for model in (reference, checkpointed):
        model.train()
        counts, loss = block_calls(model, lambda model=model: model(**batch).loss)
        loss.backward()
        losses.append(loss)
        calls.append(dict(counts))  # a checkpointed block runs its forward again in the backward pass
    assert all(calls[0].values()) and calls[1] == {kind: 2 * count for kind, count in calls[0].items()}, calls
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_peft_with_gradient_checkpointing_and_input_require_grads():
    model = tiny_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    peft_model(**synthetic_batch()).loss.backward()
    # at initialisation LoRA's B is zero, so only B receives a gradient on the first step
    grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_report_counts_adapters_separately():
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    report = trainable_report(peft_model)
    assert report.trainable == report.per_group["adapters"][0] > 0


def test_set_trainable_on_a_peft_model_trains_parts_beside_the_adapters():
    """LoRA on the experts plus the geometry heads trained in full: set_trainable froze the adapters (a run that
    trained the heads alone, silently)."""
    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=lora_target_modules(geometry=True)))
    adapters = trainable_report(peft_model).per_group["adapters"]
    report = set_trainable(peft_model, "geometry_heads")
    assert report.per_group["adapters"] == adapters and adapters[0] == adapters[1] > 0
    assert report.per_group["geometry_heads"][0] == report.per_group["geometry_heads"][1] > 0
    assert report.trainable == adapters[0] + report.per_group["geometry_heads"][0]
    assert set_trainable(peft_model, []).trainable == adapters[0]  # the adapters alone, as PEFT left them
    with pytest.raises(ValueError, match=r"\['lm_head'\].*\(the LM head trains with `embeddings`\)"):
        set_trainable(peft_model, "lm_head")


def collate_samples(samples: list[dict]) -> dict:
    """Samples of `synthetic_batch` (one each) as one batch: tensors joined along their first dimension."""
    batch = {name: torch.cat([sample[name] for sample in samples]) for name in samples[0] if name != "geometry_targets"}
    batch["geometry_targets"] = {
        name: torch.cat([sample["geometry_targets"][name] for sample in samples])
        for name in samples[0]["geometry_targets"]
    }
    return batch


@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "no-labels"])
def test_trainer_gradient_accumulation_gives_the_update_of_the_whole_batch(tmp_path, with_labels):
    """transformers' Trainer with labels passed `num_items_in_batch` and left the loss undivided by the accumulation
    steps: the geometry loss, a per-batch mean, counted twice with two steps. The geometry heads (the only trainable
    part here, so their update is the geometry loss's alone) now move as far with one batch of two as with two
    accumulated batches of one."""
    from transformers import Trainer, TrainingArguments

    sample = synthetic_batch()
    if not with_labels:
        sample.pop("labels")
    updates, largest = [], 0.0
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = tiny_model()
        set_trainable(model, "geometry_heads")
        before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        largest = max(largest, *(float(p.abs().max()) for p in before.values()))
        arguments = TrainingArguments(
            output_dir=str(tmp_path / f"run{batch_size}"), max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, save_strategy="no", report_to=[], remove_unused_columns=False,
            use_cpu=True, seed=0,
        )  # fmt: skip
        Trainer(model=model, args=arguments, train_dataset=[sample, sample], data_collator=collate_samples).train()
        updates.append(
            torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters() if n in before])
        )
    assert bool(updates[0].abs().sum() > 0)
    # an update is read as a difference of parameters, so it is exact to their rounding only (a float32 ulp of the
    # largest, 1.2e-7 near 1): a loss counted twice doubles it
    ulp = torch.finfo(torch.float32).eps * largest
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=2 * ulp)


class TestBadInput:
    def test_targets_must_match_the_views(self):
        batch = synthetic_batch()
        batch["geometry_targets"]["world_points"] = batch["geometry_targets"]["world_points"][:, :, :-1]
        with pytest.raises(ValueError, match=r"geometry_targets\['world_points'\] has shape"):
            tiny_model()(**batch)

    def test_targets_need_every_field(self):
        batch = synthetic_batch()
        del batch["geometry_targets"]["camera_poses"]
        with pytest.raises(ValueError, match="needs 'camera_poses'"):
            tiny_model()(**batch)

    def test_targets_must_be_tensors(self):
        batch = synthetic_batch()
        batch["geometry_targets"]["world_points"] = batch["geometry_targets"]["world_points"].numpy()
        with pytest.raises(TypeError, match=r"\['world_points'\]` must be a torch.Tensor, got ndarray .*from_numpy"):
            tiny_model()(**batch)

    @pytest.mark.parametrize("stage", [True, 3, "1"])
    def test_stages_are_one_or_two(self, stage):
        with pytest.raises(ValueError, match="stage must be one of \\[1, 2\\]"):
            freeze_for_stage(tiny_model(), stage)

    def test_target_points_behind_their_camera_are_left_out(self):
        """Valid points behind the first camera give every loss term of the same pixels masked: the scale-free point
        terms and also the camera term, whose target translations are scaled by the target points' mean distance
        (the behind points counted in it)."""
        batch = synthetic_batch()
        model = tiny_model()
        with torch.no_grad():
            reference = model(**batch).geometry_losses
            targets = batch["geometry_targets"]
            behind = torch.zeros_like(targets["valid_mask"])
            behind[..., :2, :] = True  # two rows of every view, moved behind the first camera
            moved = targets["world_points"].clone()
            moved[behind] = -5.0 * moved[behind]
            batch["geometry_targets"] = {**targets, "world_points": moved}
            batch["geometry_targets"]["valid_mask"] = targets["valid_mask"] & ~behind
            masked = model(**batch).geometry_losses
            batch["geometry_targets"]["valid_mask"] = targets["valid_mask"]
            unmasked = model(**batch).geometry_losses
        assert all(value >= 0 for value in reference.values())
        assert sorted(unmasked) == sorted(masked) and "camera_translation" in masked
        for name, value in masked.items():
            torch.testing.assert_close(unmasked[name], value, msg=name)

    @pytest.mark.parametrize("unknown", [float("nan"), float("inf"), -float("inf")])
    @pytest.mark.parametrize("marked", ["masked", "marked valid"])
    def test_unknown_target_points_may_hold_non_finite_values(self, unknown, marked):
        """Datasets store unknown depth as NaN or inf: at masked pixels it changes no loss and no gradient, and a
        non-finite point marked valid is left out as unknown (it made the target scale NaN, every point then
        'behind its camera', and the call failed)."""
        batch = synthetic_batch()
        targets = batch["geometry_targets"]
        unknown_pixels = torch.zeros_like(targets["valid_mask"])
        unknown_pixels[..., 1, :3] = True

        def losses_and_gradients(world_points, valid_mask):
            model = tiny_model()
            batch["geometry_targets"] = {**targets, "world_points": world_points, "valid_mask": valid_mask}
            losses = model(**batch).geometry_losses
            losses["total"].backward()
            return losses, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

        reference, reference_gradients = losses_and_gradients(
            targets["world_points"], targets["valid_mask"] & ~unknown_pixels
        )
        poisoned = targets["world_points"].masked_fill(unknown_pixels[..., None], unknown)
        valid = targets["valid_mask"] & ~unknown_pixels if marked == "masked" else targets["valid_mask"]
        losses, gradients = losses_and_gradients(poisoned, valid)
        assert torch.isfinite(gradients).all() and bool(gradients.abs().sum() > 0)
        for name, value in reference.items():
            torch.testing.assert_close(losses[name], value, msg=name)
        torch.testing.assert_close(gradients, reference_gradients)

    @pytest.mark.parametrize("unknown", ["masked", "behind the cameras"])
    def test_a_scene_without_known_points_takes_no_part_in_the_geometry_loss(self, unknown):
        """A mixed batch: the second scene's views have no known geometry. Its losses were computed with the 1e-8
        scale floor (camera translation loss 1e6); the batch's losses are now those of the first scene alone."""
        one = synthetic_batch()
        two = {name: torch.cat([value, value]) for name, value in one.items() if name != "geometry_targets"}
        targets = {name: torch.cat([value, value]) for name, value in one["geometry_targets"].items()}
        if unknown == "masked":
            targets["valid_mask"][1] = False
        else:  # every point mirrored behind the first camera
            targets["world_points"][1] = -targets["world_points"][1]
        two["geometry_targets"] = targets
        model = tiny_model().eval()
        with torch.no_grad():
            alone, mixed = model(**one).geometry_losses, model(**two).geometry_losses
        assert sorted(mixed) == sorted(alone)
        for name, value in alone.items():
            torch.testing.assert_close(mixed[name], value, rtol=1e-4, atol=1e-6, msg=name)

    def test_a_reconstruction_only_batch_trains_on_geometry_alone(self):
        # a batch whose labels are all -100 (reconstruction samples in a mixed Trainer run) is not an error
        batch = synthetic_batch()
        batch["labels"] = torch.full_like(batch["labels"], -100)
        outputs = tiny_model().train()(**batch)
        assert outputs.lm_loss.item() == 0.0
        torch.testing.assert_close(outputs.loss, outputs.geometry_losses["total"])
        outputs.loss.backward()

    def test_lora_target_matching_nothing(self):
        with pytest.raises(ValueError, match="not found in the base model"):
            get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["no_such_proj"]))

    def test_recipe_with_nothing_to_adapt(self):
        with pytest.raises(ValueError, match="at least one part"):
            lora_target_modules(semantic=False)


@pytest.mark.parametrize("recipe", sorted(LORA_RECIPES))
def test_each_lora_recipe_adapts_linear_leaves_of_its_part(recipe):
    part, pattern = LORA_RECIPES[recipe]
    model = tiny_model()
    selected = [name for name, module in model.named_modules() if re.fullmatch(rf".*\.(?:{pattern})", name)]
    assert selected and all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in selected)
    assert {part_of(f"{name}.weight") for name in selected} == {part}
