"""G2VLMProcessor: tokenizer + Qwen2-VL image processor (semantic images) + geometry image processor + chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import TensorType

from .chat_template import CHAT_TEMPLATE, RECONSTRUCTION_PROMPT
from .image_io import ImageSource, load_image
from .image_processing_geometry import G2VLMGeometryImageProcessor, as_scenes

IMAGE_TOKEN = "<|image_pad|>"
GEOMETRY_TOKEN = "<|geo_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"


class G2VLMProcessor(ProcessorMixin):
    r"""
    Builds G²VLM inputs from text, semantic images and geometry views.

    In `text`, each semantic image is written `<|vision_start|><|image_pad|><|vision_end|>` and each geometry view
    `<|vision_start|><|geo_pad|><|vision_end|>`; the processor expands every pad to the number of features of its
    image. The chat template writes these for you; in a chat, every image of a user turn is used both as a geometry
    view and as a semantic image, as the official `chat_with_recon` does.

    Args:
        image_processor ([`~transformers.Qwen2VLImageProcessor`]):
            Semantic images (the PIL backend works without torchvision).
        geometry_image_processor ([`G2VLMGeometryImageProcessor`], *optional*):
            Geometry views (defaults to the official settings: width 518, ImageNet normalisation).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            A Qwen2 tokenizer that knows `<|geo_pad|>` (the conversion adds it).
        chat_template (`str`, *optional*):
            Defaults to the official G²VLM prompt layout.
        semantic_image_size (`int`, *optional*, defaults to 768):
            Semantic images are first resized (bicubic) to this square size, as in the official chat; `None` keeps
            them as they are (the Qwen2-VL processor still resizes to multiples of 28).
    """

    def __init__(
        self,
        image_processor=None,
        geometry_image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        semantic_image_size: int | None = 768,
        **kwargs,
    ):
        self.semantic_image_size = semantic_image_size
        geometry_image_processor = geometry_image_processor or G2VLMGeometryImageProcessor()
        super().__init__(image_processor, geometry_image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        vocab = tokenizer.get_vocab()
        missing = [token for token in (IMAGE_TOKEN, GEOMETRY_TOKEN, VISION_START, VISION_END) if token not in vocab]
        if missing:
            raise ValueError(
                f"The tokenizer lacks {missing}; convert the official checkpoint with `g2vlm-convert`, which adds "
                f"{GEOMETRY_TOKEN}."
            )
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.geometry_token_id = vocab[GEOMETRY_TOKEN]
        if getattr(self.geometry_image_processor, "prompt_token_ids", None) is None:
            # lets the geometry image processor alone build the reconstruction prompt (AutoImageProcessor, the
            # depth-estimation pipeline)
            self.geometry_image_processor.prompt_token_ids = {
                "prefix": tokenizer.encode(RECONSTRUCTION_PROMPT, add_special_tokens=False),
                "vision_start": vocab[VISION_START],
                "geometry": vocab[GEOMETRY_TOKEN],
                "vision_end": vocab[VISION_END],
            }

    # Saved layout. `AutoImageProcessor.from_pretrained(folder)` reads the "image_processor" entry of
    # processor_config.json, and for a G²VLM checkpoint that must be the geometry image processor (what the
    # depth-estimation pipeline and reconstruction need), so the geometry settings are saved there and the semantic
    # (Qwen2-VL) ones as "semantic_image_processor". Folders saved in the older layout ("image_processor" = Qwen2-VL,
    # "geometry_image_processor" = geometry) still load.
    SEMANTIC_KEY = "semantic_image_processor"

    def to_dict(self) -> dict:
        output = super().to_dict()
        if "image_processor" in output and "geometry_image_processor" in output:
            output[self.SEMANTIC_KEY] = output.pop("image_processor")
            output["image_processor"] = output.pop("geometry_image_processor")
        return output

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        processor_dict = processor_dict if processor_dict is not None else {}
        semantic = processor_dict.pop(cls.SEMANTIC_KEY, None)
        if semantic is None:  # older layout: transformers' own loading finds everything
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        # Current layout: both image processors from their saved settings (not through AutoImageProcessor, which
        # without this package installed, e.g. through trust_remote_code, does not know the geometry processor).
        geometry = {k: v for k, v in processor_dict.pop("image_processor").items() if k != "image_processor_type"}
        processor_dict.pop("geometry_image_processor", None)
        arguments = {
            "image_processor": _semantic_image_processor_from_dict(semantic),
            "geometry_image_processor": G2VLMGeometryImageProcessor(**geometry),
            "tokenizer": cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, **kwargs),
        }
        return [arguments[name] for name in cls.get_attributes()]

    @staticmethod
    def get_possibly_dynamic_module(module_name):
        # Our geometry image processor is not a transformers class: resolve it here rather than registering it as
        # the AutoImageProcessor of G²VLM (that role belongs to the Qwen2-VL processor).
        if module_name == G2VLMGeometryImageProcessor.__name__:
            return G2VLMGeometryImageProcessor
        return ProcessorMixin.get_possibly_dynamic_module(module_name)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.tokenizer.model_input_names, "pixel_values", "image_grid_thw", "geometry_pixel_values"]

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        geometry_images=None,
        videos=None,
        audio=None,
        return_tensors: str | TensorType | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            text: one prompt or a batch. Without text, `geometry_images` get the official reconstruction prompt
                (`<|im_start|>Reconstruct the 3D scene.` followed by the views).
            images: semantic images: one list per prompt (or a flat list, handed out in placeholder order).
            geometry_images: geometry views: one list of views per prompt (or the views of a single prompt). When
                omitted while the text holds geometry placeholders, each prompt's `images` serve as its views.
            return_tensors: `"pt"` for PyTorch tensors.
            padding, padding_side: passed to the tokenizer (batched generation wants `padding_side="left"`).

        Returns:
            [`~transformers.BatchFeature`] with `input_ids`, `attention_mask`, and, when given, `pixel_values`,
            `image_grid_thw` and `geometry_pixel_values`.
        """
        if videos is not None or audio is not None:
            raise ValueError("G2VLM takes images only; `videos` and `audio` are not supported.")
        if text is None:
            if geometry_images is None:
                raise ValueError("Pass `text`, or `geometry_images` for the reconstruction prompt.")
            scenes = as_scenes(geometry_images)
            texts = [RECONSTRUCTION_PROMPT + f"{VISION_START}{GEOMETRY_TOKEN}{VISION_END}" * len(s) for s in scenes]
        else:
            texts = [text] if isinstance(text, str) else list(text)
        image_counts = [prompt.count(IMAGE_TOKEN) for prompt in texts]
        geometry_counts = [prompt.count(GEOMETRY_TOKEN) for prompt in texts]

        semantic = per_prompt(images, image_counts, "images", IMAGE_TOKEN)
        if geometry_images is None and any(geometry_counts) and images is not None:
            geometry_images = semantic
        geometry = per_prompt(geometry_images, geometry_counts, "geometry_images", GEOMETRY_TOKEN)

        data = {}
        if any(image_counts):
            flat = [self._semantic_image(image) for prompt_images in semantic for image in prompt_images]
            semantic_inputs = self.image_processor(images=flat, return_tensors="pt")
            data.update(pixel_values=semantic_inputs["pixel_values"], image_grid_thw=semantic_inputs["image_grid_thw"])
            merge = self.image_processor.merge_size**2
            counts = iter((semantic_inputs["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [expand(prompt, IMAGE_TOKEN, [next(counts) for _ in range(n)]) for prompt, n in zip(texts, image_counts)]
        if any(geometry_counts):
            if not all(geometry_counts):
                raise ValueError(
                    "In a batch, either every prompt has geometry views or none has; process the prompts separately."
                )
            views = self.geometry_image_processor(geometry, return_tensors="pt")["geometry_pixel_values"]
            data["geometry_pixel_values"] = views
            tokens_per_view = (views.shape[-2] // self.geometry_image_processor.patch_size) * (
                views.shape[-1] // self.geometry_image_processor.patch_size
            )
            texts = [expand(prompt, GEOMETRY_TOKEN, [tokens_per_view] * n) for prompt, n in zip(texts, geometry_counts)]

        tokenizer_kwargs = dict(padding=padding, **kwargs)
        if padding_side is not None:
            tokenizer_kwargs["padding_side"] = padding_side
        encoded = self.tokenizer(texts, **tokenizer_kwargs)
        data.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def assistant_labels(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Labels that train on the assistant replies only: a copy of `input_ids` with -100 everywhere except the
        tokens after each `<|im_start|>assistant\\n` header, up to and including the `<|im_end|>` that closes it."""
        header = self.tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        labels = torch.full_like(input_ids, -100)
        for row, ids in enumerate(input_ids.tolist()):
            position = 0
            while position <= len(ids) - len(header):
                if ids[position : position + len(header)] != header:
                    position += 1
                    continue
                start = end = position + len(header)
                while end < len(ids) and ids[end] != end_id:
                    end += 1
                end = min(end + 1, len(ids))  # the closing <|im_end|> is trained too
                labels[row, start:end] = input_ids[row, start:end]
                position = end
        return labels

    def _semantic_image(self, image: ImageSource) -> Image.Image:
        image = load_image(image)
        if self.semantic_image_size:
            image = image.resize((self.semantic_image_size,) * 2, Image.Resampling.BICUBIC)
        return image


def _semantic_image_processor_from_dict(config: dict):
    """The Qwen2-VL image processor saved under "semantic_image_processor": its class from `image_processor_type`,
    the PIL backend when torchvision is not installed (as AutoImageProcessor picks it)."""
    import transformers
    from transformers.utils import is_torchvision_available

    name = config.get("image_processor_type")
    if not name:
        raise ValueError("The saved semantic image processor has no `image_processor_type`.")
    base = name.removesuffix("Fast").removesuffix("Pil")
    candidates = [base, f"{base}Pil"] if is_torchvision_available() else [f"{base}Pil", base]
    for candidate in candidates:
        image_processor_class = getattr(transformers, candidate, None)
        if image_processor_class is not None:
            return image_processor_class(**{k: v for k, v in config.items() if k != "image_processor_type"})
    raise ValueError(f"transformers has no image processor class {name!r} (nor {base}Pil).")


def per_prompt(items, counts: list[int], name: str, token: str) -> list[list]:
    """Split `items` (nested per prompt, or flat in placeholder order) into one list per prompt, checking counts."""
    if items is None:
        items = []
    elif not isinstance(items, (list, tuple)):
        items = [items]
    if items and all(isinstance(item, (list, tuple)) for item in items):
        nested = [list(item) for item in items]
        if len(nested) != len(counts):
            raise ValueError(f"`{name}` holds {len(nested)} lists for {len(counts)} prompts: give one list per prompt.")
    else:
        if len(items) != sum(counts):
            raise ValueError(
                f"The prompts hold {sum(counts)} {token} placeholder(s) but {len(items)} `{name}` were given: "
                f"write one {token} (between {VISION_START} and {VISION_END}) per image."
            )
        flat = iter(items)
        nested = [[next(flat) for _ in range(count)] for count in counts]
    for index, (prompt_items, count) in enumerate(zip(nested, counts)):
        if len(prompt_items) != count:
            raise ValueError(
                f"Prompt {index} holds {count} {token} placeholder(s) but {len(prompt_items)} `{name}` were given for it."
            )
    return nested


def expand(prompt: str, token: str, lengths: list[int]) -> str:
    """Replace the i-th `token` of `prompt` by `lengths[i]` copies of it."""
    pieces = prompt.split(token)
    out = [pieces[0]]
    for length, piece in zip(lengths, pieces[1:]):
        out.append(token * length + piece)
    return "".join(out)


__all__ = ["G2VLMProcessor"]
