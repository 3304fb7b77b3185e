"""The model card (README.md) of a pushed G²VLM checkpoint, built with huggingface_hub's `ModelCard`.

Every ```python block of the card is self-contained and runs as written against the pushed repository (the tests
execute them against the offline Hub server): they load the model through `trust_remote_code=True`, so they work
without g2vlm_hf installed. When example images are pushed with the model, the snippets download them; otherwise they
name local image files the reader replaces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from string import Template

import transformers
from huggingface_hub import ModelCard, ModelCardData

from .sharding import component_description

DEFAULT_BASE_MODEL = "InternRobotics/G2VLM-2B-MoT"
EXAMPLES_DIR = "examples"
DEFAULT_QUESTION = "Which object is closest to the camera? Answer in one sentence."
TAGS = ["g2vlm", "3d-reconstruction", "spatial-reasoning", "multi-view", "vision-language-model", "custom_code"]


@dataclass
class ModelCardInfo:
    """What the card says about one pushed checkpoint.

    Args:
        repo_id: the repository the card is pushed to (the snippets load it).
        reconstruction_only: the repository holds [`G2VLMForReconstruction`] (no ViT, no LM head).
        base_model: Hub id of the original checkpoint (card metadata `base_model`).
        source: where the converted weights came from (a Hub id or a folder name; no local paths).
        source_revision: the revision of `source`, when known.
        parity: figures of the comparison with the official implementation, e.g.
            `{"camera poses, fp32 (max rel. error)": "1.2e-6"}`.
        example_images: file names under `examples/` in the repository, used by the snippets.
        example_question: the question of the chat snippet.
        components: component -> shard files (from the index), listed in the card.
        package_version: the g2vlm-hf version that converted the checkpoint.
        verified: the push compares every file the Hub serves with the uploaded one (sha256).
    """

    repo_id: str
    reconstruction_only: bool = False
    base_model: str | None = DEFAULT_BASE_MODEL
    source: str | None = None
    source_revision: str | None = None
    parity: Mapping[str, str] = field(default_factory=dict)
    example_images: Sequence[str] = ()
    example_question: str = DEFAULT_QUESTION
    components: Mapping[str, Sequence[str]] = field(default_factory=dict)
    package_version: str | None = None
    verified: bool = True


CHAT_SNIPPET = Template(
    """\
import torch
${imports}from transformers import AutoModelForImageTextToText, AutoProcessor

repo_id = "${repo_id}"
model = AutoModelForImageTextToText.from_pretrained(repo_id, dtype="auto", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
${views}
# Each image of the turn enters twice: as a geometry view (3D) and as a semantic image.
messages = [{"role": "user", "content": [
    *[{"type": "image", "image": view} for view in views],
    {"type": "text", "text": ${question}},
]}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
with torch.inference_mode():
    output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""
)

RECONSTRUCTION_SNIPPET = Template(
    """\
import torch
${imports}from transformers import ${auto_class}, AutoProcessor

repo_id = "${repo_id}"
model = ${auto_class}.from_pretrained(repo_id, dtype="auto", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
${views}
with torch.inference_mode():
    scene = model.reconstruct(**processor(geometry_images=views, return_tensors="pt"))
print(scene.camera_poses.shape)  # (1, views, 4, 4) camera-to-world
print(scene.world_points.shape)  # (1, views, H, W, 3) point map in the world frame
print(scene.depth.shape)  # (1, views, H, W)
"""
)

SEMANTIC_LORA = """\
# The semantic expert keeps the Qwen2 leaf names: a standard recipe adapts it and leaves 3D untouched.
semantic = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
peft_model = get_peft_model(model, semantic)
adapted = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
assert adapted and not any(".geo_" in name for name in adapted)
peft_model.print_trainable_parameters()
model = peft_model.unload()  # back to the plain model for the next recipe

"""

LORA_SNIPPET = Template(
    """\
from peft import LoraConfig, get_peft_model
from transformers import ${auto_class}

repo_id = "${repo_id}"
model = ${auto_class}.from_pretrained(repo_id, trust_remote_code=True)

${semantic}# The geometry expert's leaves are named geo_*: target them by name to adapt the 3D pathway.
geometry = LoraConfig(
    r=8,
    lora_alpha=16,
    target_modules=["geo_q_proj", "geo_k_proj", "geo_v_proj", "geo_o_proj", "geo_gate_proj", "geo_up_proj",
                    "geo_down_proj"],
)
peft_model = get_peft_model(model, geometry)
adapted = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
assert adapted and all(".geo_" in name for name in adapted)
peft_model.print_trainable_parameters()
"""
)


def _snippet_values(info: ModelCardInfo) -> dict[str, str]:
    """Template values shared by the snippets: repo id, model class, and how the example views are obtained."""
    values = {
        "repo_id": info.repo_id,
        "auto_class": "AutoModel" if info.reconstruction_only else "AutoModelForImageTextToText",
        "question": json.dumps(info.example_question, ensure_ascii=False),
        "imports": "",
        "views": 'views = ["view_0.jpg", "view_1.jpg", "view_2.jpg"]  # your photos of one scene (paths or PIL images)\n',
    }
    if info.example_images:
        names = ", ".join(json.dumps(name, ensure_ascii=False) for name in info.example_images)
        values["imports"] = "from huggingface_hub import hf_hub_download\n"
        values["views"] = (
            f'views = [hf_hub_download(repo_id, f"{EXAMPLES_DIR}/{{name}}") for name in [{names}]]'
            "  # or your own photos of one scene\n"
        )
    return values


def chat_snippet(info: ModelCardInfo) -> str:
    """Spatial chat over the example views (full model only)."""
    return CHAT_SNIPPET.substitute(_snippet_values(info))


def reconstruction_snippet(info: ModelCardInfo) -> str:
    """3D reconstruction of the example views."""
    return RECONSTRUCTION_SNIPPET.substitute(_snippet_values(info))


def lora_snippet(info: ModelCardInfo) -> str:
    """LoRA on the semantic expert (full model) and on the geometry expert."""
    semantic = "" if info.reconstruction_only else SEMANTIC_LORA
    return LORA_SNIPPET.substitute(_snippet_values(info), semantic=semantic)


def _components_table(info: ModelCardInfo) -> str:
    if not info.components:
        return ""
    rows = "".join(
        f"| `{component}` | {component_description(component)} | {', '.join(f'`{f}`' for f in files)} |\n"
        for component, files in info.components.items()
    )
    return (
        "The weights are sharded by component, so each part of the model is a file of its own:\n\n"
        "| component | what | files |\n| --- | --- | --- |\n" + rows + "\n"
    )


def _conversion_section(info: ModelCardInfo) -> str:
    source = f"`{info.source}`" if info.source else "the official G²VLM checkpoint"
    if info.source_revision:
        source += f" (revision `{info.source_revision}`)"
    version = f" {info.package_version}" if info.package_version else ""
    text = (
        f"Converted from {source} with `g2vlm-convert` (g2vlm-hf{version}, transformers {transformers.__version__}): "
        "every official weight is renamed through one table, the tokenizer gains the `<|geo_pad|>` placeholder, and "
        "the result is checked to load with no missing or unexpected weight."
    )
    if info.verified:
        text += " The upload was checked by downloading every file back and comparing sha256 digests."
    text += "\n"
    if info.parity:
        rows = "".join(f"| {name} | {value} |\n" for name, value in info.parity.items())
        text += "\nParity with the official implementation:\n\n| check | result |\n| --- | --- |\n" + rows
    return text


def build_model_card(info: ModelCardInfo) -> ModelCard:
    """The card of a pushed G²VLM checkpoint: metadata, description, usage snippets, conversion record."""
    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-to-3d" if info.reconstruction_only else "image-text-to-text",
        tags=list(TAGS),
        base_model=info.base_model,
    )
    kind = "reconstruction-only " if info.reconstruction_only else ""
    what = (
        "This repository holds only what 3D reconstruction runs through: the DINOv2 geometry encoder, the "
        "two-expert decoder and the geometry heads (no semantic ViT, no LM head). Its reconstructions equal the full "
        "model's.\n"
        if info.reconstruction_only
        else "It answers spatial questions about images (chat) and reconstructs scenes in 3D; the geometry of the "
        "views sits in the language model's context while it answers.\n"
    )
    chat = "" if info.reconstruction_only else f"### Spatial chat\n\n```python\n{chat_snippet(info)}```\n\n"
    body = f"""
# G²VLM ({kind}transformers format)

[G²VLM](https://arxiv.org/abs/2511.21688) is a geometry-grounded vision-language model: from several views of a scene
it predicts camera poses (camera-to-world), per-pixel point maps and depth. Every decoder layer has two experts over
one attention: a semantic expert (text and semantic image tokens) and a geometry expert (DINOv2 patch tokens).
{what}
{_components_table(info)}## Usage

The code of the model travels with this repository (`trust_remote_code=True`; it needs torch, transformers, numpy and
Pillow). With the `g2vlm-hf` package installed, `import g2vlm_hf` registers the same classes and
`trust_remote_code` is not needed.

{chat}### 3D reconstruction

```python
{reconstruction_snippet(info)}```

With `g2vlm-hf` installed, the command line writes a GLB scene, a PLY point cloud, cameras and depth maps:

```bash
g2vlm reconstruct --model {info.repo_id} view_0.jpg view_1.jpg view_2.jpg --output scene/
```

### LoRA fine-tuning

The geometry expert's leaves are `geo_q_proj`, `geo_k_proj`, `geo_v_proj`, `geo_o_proj`, `geo_mlp.geo_gate_proj`,
`geo_mlp.geo_up_proj` and `geo_mlp.geo_down_proj`; PEFT matches `target_modules` by name suffix, so
`["q_proj", "k_proj", "v_proj", "o_proj"]` adapts the semantic expert only.

```python
{lora_snippet(info)}```

## Conversion

{_conversion_section(info)}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


__all__ = ["ModelCardInfo", "build_model_card", "chat_snippet", "lora_snippet", "reconstruction_snippet"]
