"""G2VLMProcessor: tokenizer + Qwen2-VL image processor (semantic images) + geometry image processor + chat template."""

from __future__ import annotations

import re
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, TextKwargs, Unpack

try:  # transformers >= 5.23 marks the placeholders that user text writes (sanitize_control_tokens)
    from transformers.processing_utils import _UNMARKED
except ImportError:
    _UNMARKED = ""
from transformers.tokenization_utils_base import TextInput

from .chat_template import CHAT_TEMPLATE, RECONSTRUCTION_PROMPT, check_chat_content
from .image_io import ImageSource, is_url, load_image
from .image_processing_geometry import G2VLMGeometryImageProcessor, G2VLMGeometryImagesKwargs, as_scenes
from .processing_compat import SubprocessorLoading

IMAGE_TOKEN = "<|image_pad|>"
GEOMETRY_TOKEN = "<|geo_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
ASSISTANT_HEADER = "<|im_start|>assistant\n"

# Processor-level switches that transformers may also mirror into `text_kwargs`; never handed to the tokenizer.
_PROCESSOR_SWITCHES = ("return_mm_token_type_ids", "return_text_replacement_offsets")


class G2VLMProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of [`G2VLMProcessor.__call__`]: `text_kwargs` (tokenizer), `images_kwargs` (semantic
    Qwen2-VL image processor) and `geometry_images_kwargs` (geometry image processor), each also accepted flat."""

    geometry_images_kwargs: G2VLMGeometryImagesKwargs
    # Batches of prompts of different lengths pad to the longest by default (the tokenizer's own default is no
    # padding); a saved tokenizer default or an explicit `padding=` wins over this.
    _defaults = {"text_kwargs": {"padding": True}}


class _G2VLMModalityKwargs(ProcessingKwargs, total=False):
    """`G2VLMProcessorKwargs` without the geometry group: what transformers' `_merge_kwargs` knows how to route."""

    _defaults = G2VLMProcessorKwargs._defaults


class G2VLMProcessor(SubprocessorLoading):  # a ProcessorMixin (processing_compat.py)
    r"""
    Builds G²VLM inputs from text, semantic images and geometry views.

    In `text`, each semantic image is written `<|vision_start|><|image_pad|><|vision_end|>` and each geometry view
    `<|vision_start|><|geo_pad|><|vision_end|>`; the processor expands every pad to the number of features of its
    image. The chat template writes these for you; in a chat, every image of a user turn is used both as a geometry
    view and as a semantic image, as the official `chat_with_recon` does.

    Keyword arguments follow transformers' processors (see [`G2VLMProcessorKwargs`]): flat (`padding="max_length"`,
    `do_rescale=False`, `target_width=...`) or grouped (`text_kwargs={...}`, `images_kwargs={...}`,
    `geometry_images_kwargs={...}`), with the tokenizer's saved defaults applied unless overridden.

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

    valid_processor_kwargs = G2VLMProcessorKwargs
    image_token = IMAGE_TOKEN
    geometry_token = GEOMETRY_TOKEN

    def __init__(
        self,
        image_processor=None,
        geometry_image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        semantic_image_size: int | None = 768,
        **kwargs,
    ):
        if isinstance(image_processor, G2VLMGeometryImageProcessor):
            raise ValueError(
                "`image_processor` takes the semantic (Qwen2-VL) image processor and `geometry_image_processor` the "
                "G2VLMGeometryImageProcessor, which is what AutoImageProcessor loads from a G2VLM folder; load the "
                "processor with AutoProcessor.from_pretrained, or pass each image processor to its own argument."
            )
        self.semantic_image_size = semantic_image_size
        geometry_image_processor = geometry_image_processor or G2VLMGeometryImageProcessor()
        super().__init__(
            image_processor, geometry_image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE
        )
        vocab = tokenizer.get_vocab()
        missing = [token for token in (IMAGE_TOKEN, GEOMETRY_TOKEN, VISION_START, VISION_END) if token not in vocab]
        if missing:
            raise ValueError(
                f"The tokenizer lacks {missing}; convert the official checkpoint with `g2vlm-convert`, which adds "
                f"{GEOMETRY_TOKEN}."
            )
        self.image_token_id = vocab[IMAGE_TOKEN]
        self.geometry_token_id = vocab[GEOMETRY_TOKEN]

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
    def _load_image_processors(
        cls, processor_dict: dict[str, Any], given: dict[str, Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Both image processors from their saved settings, in the current layout or the older one, on every
        transformers release (see `SubprocessorLoading`). Not through AutoImageProcessor: that gives the geometry
        processor for "image_processor", and without this package installed (trust_remote_code) it does not know the
        geometry processor at all. Settings given to `from_pretrained` reach each image processor that takes them, as
        AutoImageProcessor does."""
        if cls.SEMANTIC_KEY in processor_dict:  # current layout
            semantic = processor_dict.pop(cls.SEMANTIC_KEY)
            geometry = processor_dict.pop("image_processor", None)
            processor_dict.pop("geometry_image_processor", None)
        else:  # older layout: "image_processor" = Qwen2-VL, "geometry_image_processor" = geometry
            semantic = processor_dict.pop("image_processor", None)
            geometry = processor_dict.pop("geometry_image_processor", None)
        loaded: dict[str, Any] = {}
        if "image_processor" not in given:
            if not isinstance(semantic, dict):
                raise ValueError(
                    "The folder's processor_config.json holds no image processor settings: it is not a saved "
                    "G2VLMProcessor. Convert the official checkpoint with `g2vlm-convert`, or pass `image_processor=`."
                )
            loaded["image_processor"] = _semantic_image_processor_from_dict(semantic, **kwargs)
        if "geometry_image_processor" not in given:
            settings = {k: v for k, v in (geometry or {}).items() if k not in ("image_processor_type", "auto_map")}
            settings.update({k: v for k, v in kwargs.items() if k in G2VLMGeometryImagesKwargs.__annotations__})
            loaded["geometry_image_processor"] = G2VLMGeometryImageProcessor(**settings)
        return loaded

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

    def _merge_kwargs(
        self,
        ModelProcessorKwargs: type | None = None,
        tokenizer_init_kwargs: dict | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """transformers' `_merge_kwargs` (text and image groups, same precedence), plus `geometry_images_kwargs`:
        flat geometry keywords win over the `geometry_images_kwargs` dict, which wins over the geometry image
        processor's own settings."""
        if ModelProcessorKwargs is None or ModelProcessorKwargs is G2VLMProcessorKwargs:
            ModelProcessorKwargs = _G2VLMModalityKwargs
        geometry_names = set(G2VLMGeometryImagesKwargs.__annotations__)
        nested = dict(kwargs.pop("geometry_images_kwargs", None) or {})
        unknown = sorted(set(nested) - geometry_names)
        if unknown:
            raise ValueError(
                f"`geometry_images_kwargs` takes {sorted(geometry_names)}; {unknown} are not geometry image "
                "processor settings."
            )
        flat = {key: kwargs[key] for key in geometry_names if key in kwargs}
        doubled = sorted(set(flat) & set(nested))
        if doubled:
            raise ValueError(
                f"Keyword argument(s) {doubled} were passed two times: in `geometry_images_kwargs` and as a **kwarg."
            )
        # Keys only the geometry processor takes would be reported as ignored by transformers' merge.
        for key in set(flat) - self._other_component_kwarg_names():
            kwargs.pop(key)
        merged = super()._merge_kwargs(ModelProcessorKwargs, tokenizer_init_kwargs=tokenizer_init_kwargs, **kwargs)
        merged["geometry_images_kwargs"] = {**nested, **flat}
        return merged

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        geometry_images: ImageInput | None = None,
        **kwargs: Unpack[G2VLMProcessorKwargs],
    ) -> BatchFeature:
        """
        Args:
            images: semantic images (paths, URLs, PIL images or arrays): one list per prompt, or a flat list handed
                out in placeholder order.
            text: one prompt or a batch. Without text, `geometry_images` get the official reconstruction prompt
                (`<|im_start|>Reconstruct the 3D scene.` followed by the views).
            geometry_images: geometry views: one list of views per prompt (or the views of a single prompt). When
                omitted while the text holds geometry placeholders, each prompt's `images` serve as its views.
            **kwargs: see [`G2VLMProcessorKwargs`], e.g. `return_tensors="pt"`, `padding_side="left"` (batched
                generation), `max_length`, `do_rescale`, `target_width`, `return_offsets_mapping`,
                `return_text_replacement_offsets`, `return_mm_token_type_ids`.

        Returns:
            [`~transformers.BatchFeature`] with the tokenizer's outputs (`input_ids`, `attention_mask`, ...) and,
            when given, `pixel_values`, `image_grid_thw` and `geometry_pixel_values`.
        """
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"G2VLM takes images only; `{modality}` are not supported.")
        if text is None:
            if images is not None:
                raise ValueError(
                    "`images` need a `text` holding their placeholders (the first positional argument is `images`, "
                    "as in transformers' processors: pass the prompt as `text=`)."
                )
            if geometry_images is None:
                raise ValueError("Pass `text`, or `geometry_images` for the reconstruction prompt.")
            scenes = as_scenes(geometry_images)
            texts = [RECONSTRUCTION_PROMPT + f"{VISION_START}{GEOMETRY_TOKEN}{VISION_END}" * len(s) for s in scenes]
        elif isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(prompt, str) for prompt in text):
            texts = list(text)
            if not texts:
                raise ValueError("`text` is an empty list: pass at least one prompt.")
        else:
            raise ValueError("`text` must be a string or a list of strings.")

        merged = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = dict(merged["text_kwargs"])
        switches = {key: bool(text_kwargs.pop(key, None) or merged.get(key)) for key in _PROCESSOR_SWITCHES}
        return_tensors = text_kwargs.pop("return_tensors", None)
        marked = bool(text_kwargs.get("sanitize_control_tokens"))

        image_counts = [count_placeholders(prompt, IMAGE_TOKEN, marked) for prompt in texts]
        geometry_counts = [count_placeholders(prompt, GEOMETRY_TOKEN, marked) for prompt in texts]
        semantic = per_prompt(images, image_counts, "images", IMAGE_TOKEN)
        if geometry_images is None and any(geometry_counts) and images is not None:
            geometry_images = semantic
        geometry = per_prompt(geometry_images, geometry_counts, "geometry_images", GEOMETRY_TOKEN)
        # Fetch each URL once, even when an image serves both as semantic image and as geometry view.
        fetched: dict[str, Image.Image] = {}
        semantic = [[_fetch_once(image, fetched) for image in prompt_images] for prompt_images in semantic]
        geometry = [[_fetch_once(view, fetched) for view in prompt_views] for prompt_views in geometry]

        data: dict[str, Any] = {}
        image_replacements, geometry_replacements = [], []
        if any(image_counts):
            flat = [image for prompt_images in semantic for image in prompt_images]
            images_kwargs = {**merged["images_kwargs"], "return_tensors": "pt"}
            processed, image_replacements = self._process_images(flat, **images_kwargs)
            data.update(processed)
        if any(geometry_counts):
            if not all(geometry_counts):
                raise ValueError(
                    "In a batch, either every prompt has geometry views or none has; process the prompts separately."
                )
            processed, geometry_replacements = self._process_geometry_images(
                geometry, **merged["geometry_images_kwargs"]
            )
            data.update(processed)

        texts, offsets = self.get_text_with_replacements(
            texts, image_replacements, geometry_replacements=geometry_replacements
        )
        encoded = self.tokenizer(texts, **text_kwargs)
        self._check_special_mm_tokens(texts, encoded, modalities=["image", "geometry"])
        data.update(encoded)
        if switches["return_text_replacement_offsets"]:
            data["text_replacement_offsets"] = offsets
        if switches["return_mm_token_type_ids"]:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(encoded["input_ids"])
        skip = sorted({*getattr(self, "skip_tensor_conversion", []), "text_replacement_offsets"})
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=skip)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' `apply_chat_template`, after checking that each content item is text or an image (the
        template would leave an item of another type out of the prompt without a word)."""
        check_chat_content(conversation)
        return super().apply_chat_template(conversation, *args, **kwargs)

    @property
    def image_token_ids(self) -> list[int]:
        """Ids that `create_mm_token_type_ids` types as image features (1): semantic image and geometry tokens."""
        return [self.image_token_id, self.geometry_token_id]

    def _process_images(self, images: list, **kwargs) -> tuple[dict, list[str]]:
        """transformers' hook for the semantic images, after the official pre-resize (see `semantic_image_size`)."""
        return super()._process_images([self._semantic_image(image) for image in images], **kwargs)

    def _process_geometry_images(self, scenes: list[list], **kwargs) -> tuple[dict, list[str]]:
        """`_process_images` for the geometry views (one list per prompt): their pixels, and the run of placeholders
        that stands for each view (one token per patch)."""
        settings = {key: value for key, value in kwargs.items() if value is not None}  # for this call only
        views = self.geometry_image_processor(scenes, return_tensors="pt", **settings)["geometry_pixel_values"]
        patch = self.geometry_image_processor.patch_size
        tokens_per_view = (views.shape[-2] // patch) * (views.shape[-1] // patch)
        replacements = [GEOMETRY_TOKEN * tokens_per_view] * sum(len(scene) for scene in scenes)
        return {"geometry_pixel_values": views}, replacements

    def get_text_with_replacements(
        self,
        text: list[str],
        images_replacements: list[str] = (),
        videos_replacements: list[str] = (),
        audio_replacements: list[str] = (),
        geometry_replacements: list[str] = (),
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """transformers' hook, with the geometry placeholders: replaces, in order through the batch, the i-th
        `<|image_pad|>` by `images_replacements[i]` and the i-th `<|geo_pad|>` by `geometry_replacements[i]`.

        Also returns, per prompt, transformers' replacement offsets (`type`, `span` in the original prompt, `new_span`
        in the expanded one, `text`, `replacement`), which `apply_chat_template` uses to place assistant masks.
        """
        replacements = {IMAGE_TOKEN: images_replacements, GEOMETRY_TOKEN: geometry_replacements}
        kinds = {IMAGE_TOKEN: "image", GEOMETRY_TOKEN: "geometry_image"}
        active = [token for token, values in replacements.items() if values]
        if not active:
            return list(text), [[] for _ in text]
        pattern = re.compile("|".join(f"(?:{placeholder_pattern(token)})" for token in active))
        queues = {token: iter(replacements[token]) for token in active}
        expanded, offsets = [], []
        for prompt in text:
            pieces, prompt_offsets, last, shift = [], [], 0, 0
            for match in pattern.finditer(prompt):
                token = match.group()
                replacement = next(queues[token])
                start, end = match.span()
                pieces += [prompt[last:start], replacement]
                new_start = start + shift
                prompt_offsets.append(
                    {
                        "type": kinds[token],
                        "span": (start, end),
                        "new_span": (new_start, new_start + len(replacement)),
                        "text": token,
                        "replacement": replacement,
                    }
                )
                shift += len(replacement) - (end - start)
                last = end
            pieces.append(prompt[last:])
            expanded.append("".join(pieces))
            offsets.append(prompt_offsets)
        return expanded, offsets

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The `<|image_pad|>` run that stands for semantic image `image_idx` (one per merged ViT patch)."""
        merge = self.image_processor.merge_size**2
        return IMAGE_TOKEN * int(image_inputs["image_grid_thw"][image_idx].prod() // merge)

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

    def _other_component_kwarg_names(self) -> set[str]:
        """Keyword names the tokenizer or the semantic image processor take (flat ones are routed to them too)."""
        valid = getattr(self.image_processor, "valid_kwargs", None)
        return {
            *TextKwargs.__annotations__,
            *ImagesKwargs.__annotations__,
            *getattr(valid, "__annotations__", {}),
        }


def placeholder_pattern(token: str) -> str:
    """Regex of a placeholder that stands for media. transformers (5.23 on) marks the placeholders typed in user text
    under `apply_chat_template(sanitize_control_tokens=True)`; those stay text, so the pattern skips marked ones (the
    lookbehind is transformers' private `_UNMARKED`: its public `get_text_with_replacements` knows image, video and
    audio tokens only)."""
    return _UNMARKED + re.escape(token)


def count_placeholders(prompt: str, token: str, marked: bool) -> int:
    """Placeholders of `token` in `prompt` that stand for media (skipping marked ones when `marked`)."""
    return len(re.findall(placeholder_pattern(token), prompt)) if marked else prompt.count(token)


def _fetch_once(image: Any, fetched: dict[str, Image.Image]) -> Any:
    """`image`, or the image its http(s) URL points to (each URL fetched once per call)."""
    if not is_url(image):
        return image
    if image not in fetched:
        fetched[image] = load_image(image)
    return fetched[image]


def _semantic_image_processor_from_dict(config: dict, **kwargs):
    """The Qwen2-VL image processor saved under "semantic_image_processor": its class from `image_processor_type`,
    the PIL backend when torchvision is not installed (as AutoImageProcessor picks it); `kwargs` override the saved
    settings it takes."""
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
            settings = {k: v for k, v in config.items() if k != "image_processor_type"}
            return image_processor_class.from_dict(settings, **kwargs)
    raise ValueError(f"transformers has no image processor class {name!r} (nor {base}Pil).")


def per_prompt(items, counts: list[int], name: str, token: str) -> list[list]:
    """Split `items` (nested per prompt, or flat in placeholder order) into one list per prompt, checking counts."""
    mismatch = f"the number of {token} tokens in the prompts should be the same as the number of `{name}`"
    if items is None:
        items = []
    elif not isinstance(items, (list, tuple)):
        items = [items]
    if items and all(isinstance(item, (list, tuple)) for item in items):
        nested = [list(item) for item in items]
        if len(nested) != len(counts):
            raise ValueError(
                f"`{name}` holds {len(nested)} lists for {len(counts)} prompts: give one list per prompt ({mismatch})."
            )
    else:
        if len(items) != sum(counts):
            raise ValueError(
                f"The prompts hold {sum(counts)} {token} placeholder(s) but {len(items)} `{name}` were given: "
                f"{mismatch}; write one {token} (between {VISION_START} and {VISION_END}) per image."
            )
        flat = iter(items)
        nested = [[next(flat) for _ in range(count)] for count in counts]
    for index, (prompt_items, count) in enumerate(zip(nested, counts)):
        if len(prompt_items) != count:
            raise ValueError(
                f"Prompt {index} holds {count} {token} placeholder(s) but {len(prompt_items)} `{name}` were given for "
                f"it ({mismatch})."
            )
    return nested


__all__ = ["G2VLMProcessor", "G2VLMProcessorKwargs"]
