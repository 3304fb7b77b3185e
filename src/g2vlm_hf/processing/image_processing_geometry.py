"""Image processor of the geometry (DINOv2) views, reproducing the official G²VLM preprocessing."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import Unpack
from transformers.utils import TensorType

from ..integers import is_integer
from .image_io import ImageSource, load_image

# Key/value bytes per prompt token of G²VLM-2B in bfloat16 (28 layers x K and V x 2 KV heads x 128 dims x 2 bytes),
# used to tell users what a very long list of views would cost.
G2VLM_2B_KV_BYTES_PER_TOKEN = 28 * 2 * 2 * 128 * 2


class G2VLMGeometryImagesKwargs(TypedDict, total=False):
    r"""
    Per-call settings of the geometry image processor ([`G2VLMGeometryImageProcessor`]): each overrides the
    processor's own for one call, which leaves the processor unchanged; a missing or `None` one keeps the processor's.
    Through [`G2VLMProcessor`] they are given flat or as `geometry_images_kwargs={...}`; a flat keyword that the
    semantic image processor also takes (`do_resize`, `do_normalize`, `image_mean`, `image_std`) reaches both, as
    transformers does for every component that takes it.

    do_resize (`bool`, *optional*):
        Resize the views to `target_width`.
    target_width (`int`, *optional*):
        Width of the resized views in pixels.
    do_normalize (`bool`, *optional*):
        Normalise with `image_mean` and `image_std`.
    image_mean (`float` or `list[float]`, *optional*):
    image_std (`float` or `list[float]`, *optional*):
    max_views (`int`, *optional*):
        Largest number of views in one scene.
    resize_views_to_first (`bool`, *optional*):
        Resize views whose size differs from the first view's to it (otherwise such views raise a ValueError).
    """

    do_resize: bool | None
    target_width: int | None
    do_normalize: bool | None
    image_mean: float | list[float] | tuple[float, ...] | None
    image_std: float | list[float] | tuple[float, ...] | None
    max_views: int | None
    resize_views_to_first: bool | None


@dataclass(frozen=True)
class _ViewSettings:
    """The settings one call works with: its own overrides over the processor's values."""

    do_resize: bool
    target_width: int
    do_normalize: bool
    image_mean: list[float]
    image_std: list[float]
    max_views: int
    resize_views_to_first: bool


class G2VLMGeometryImageProcessor(BaseImageProcessor):
    r"""
    Turns the views of a scene into `geometry_pixel_values` `(scenes, views, 3, H, W)`, as the official code does:
    every view is resized (LANCZOS) to `target_width` and the height the FIRST view's aspect ratio gives, rounded to a
    multiple of `patch_size`; sides that are still not multiples of the patch are then resized (bilinear,
    antialiased) down to the nearest multiple; values are scaled to [0, 1] and normalised with the ImageNet mean/std.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Resize to `target_width`. Without it, sides are only brought down to multiples of `patch_size`.
        target_width (`int`, *optional*, defaults to 518):
            Width of the resized views in pixels.
        patch_size (`int`, *optional*, defaults to 14):
            Geometry encoder patch; output sides are multiples of it.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Normalise with `image_mean` and `image_std` after scaling to [0, 1].
        image_mean (`float` or `list[float]`, *optional*, defaults to the ImageNet mean):
            One number or one per RGB channel.
        image_std (`float` or `list[float]`, *optional*, defaults to the ImageNet std):
            One positive number or one per RGB channel.
        max_views (`int`, *optional*, defaults to 256):
            Largest number of views in one scene; more raise a ValueError with a memory estimate.
        max_tokens_per_view (`int`, *optional*, defaults to 4096):
            Largest number of geometry tokens (patches) of one resized view; more raise a ValueError.
        max_aspect_ratio (`float`, *optional*, defaults to 4.0):
            Largest ratio of the long to the short side of a view.
        resize_views_to_first (`bool`, *optional*, defaults to `False`):
            Resize views whose size differs from the first view's to it (the official behaviour); without it such
            views raise a ValueError instead of being silently squashed.
    """

    model_input_names = ["geometry_pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        target_width: int = 518,
        patch_size: int = 14,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: float | Sequence[float] = IMAGENET_DEFAULT_STD,
        max_views: int = 256,
        max_tokens_per_view: int = 4096,
        max_aspect_ratio: float = 4.0,
        resize_views_to_first: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("patch_size", patch_size), ("max_tokens_per_view", max_tokens_per_view)):
            if not _is_count(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if (
            isinstance(max_aspect_ratio, bool)
            or not isinstance(max_aspect_ratio, numbers.Real)
            or not max_aspect_ratio >= 1
        ):
            raise ValueError(
                f"max_aspect_ratio must be a number of at least 1 (the long side over the short), got "
                f"{max_aspect_ratio!r}."
            )
        self.do_resize = do_resize
        self.target_width = target_width
        self.patch_size = int(patch_size)
        self.do_normalize = do_normalize
        self.image_mean = _per_channel(image_mean)
        self.image_std = _per_channel(image_std)
        self.max_views = max_views
        self.max_tokens_per_view = int(max_tokens_per_view)
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.resize_views_to_first = resize_views_to_first
        self._call_settings({})  # the same checks as the settings of a call
        # Python numbers from here on: a NumPy integer would not save to the processor's JSON.
        self.target_width, self.max_views = int(target_width), int(max_views)

    def __call__(self, images, return_tensors: str | TensorType | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images: ImageSource | Sequence[ImageSource] | Sequence[Sequence[ImageSource]],
        return_tensors: str | TensorType | None = "pt",
        **kwargs: Unpack[G2VLMGeometryImagesKwargs],
    ) -> BatchFeature:
        """
        Args:
            images: one view, the views of one scene, or a list of scenes (each a list of views). Paths, PIL images
                and arrays are accepted (see `load_image` for the colour conversions).
            kwargs ([`G2VLMGeometryImagesKwargs`]): settings for this call only (see the class arguments); `None`
                keeps the processor's own. The processor itself is left unchanged.

        Returns:
            `BatchFeature` with `geometry_pixel_values` `(scenes, views, 3, H, W)`; all scenes of a batch must give
            the same number of views and size.
        """
        settings = self._call_settings(kwargs)
        scenes = [self._scene_pixels(scene, settings) for scene in as_scenes(images)]
        shapes = sorted({tuple(scene.shape) for scene in scenes})
        if len(shapes) > 1:
            raise ValueError(
                f"The scenes of a batch give different numbers of views or sizes {shapes}; process them one by one."
            )
        return BatchFeature({"geometry_pixel_values": torch.stack(scenes)}, tensor_type=return_tensors)

    def post_process_depth_estimation(
        self, outputs, target_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per-view depth at the requested sizes (the depth-estimation pipeline's post-processing).

        Args:
            outputs: a [`G2VLMForDepthEstimation`] output (its `predicted_depth` `(views, H, W)`, all views of all
                scenes in order).
            target_sizes (`list[tuple[int, int]]`, *optional*): `(height, width)` per view (e.g. the original image
                sizes); the depth is resized there (bilinear). None keeps the processed size.

        Returns:
            `list[dict]`: one `{"predicted_depth": (height, width) tensor}` per view.
        """
        depth = outputs["predicted_depth"] if isinstance(outputs, dict) else outputs.predicted_depth
        if depth.ndim != 3:
            raise ValueError(
                f"`predicted_depth` must be (views, height, width), all views of all scenes in order (the output of "
                f"G2VLMForDepthEstimation), got shape {tuple(depth.shape)}; for a reconstruction's (scenes, views, "
                "height, width) depth pass `depth.flatten(0, 1)`."
            )
        if target_sizes is not None and len(target_sizes) != depth.shape[0]:
            raise ValueError(f"{len(target_sizes)} target sizes for {depth.shape[0]} depth maps")
        results = []
        for index, view in enumerate(depth):
            if target_sizes is not None and tuple(target_sizes[index]) != tuple(view.shape):
                view = F.interpolate(view[None, None].float(), size=tuple(target_sizes[index]), mode="bilinear")[0, 0]
            results.append({"predicted_depth": view})
        return results

    def preprocess_scene(
        self, views: Sequence[ImageSource], **kwargs: Unpack[G2VLMGeometryImagesKwargs]
    ) -> torch.Tensor:
        """`(views, 3, H, W)` normalised pixels of one scene (settings given here apply to this call only)."""
        if isinstance(views, (str, os.PathLike, Image.Image)):
            raise ValueError(
                f"preprocess_scene takes the views of one scene as a list; got a single {type(views).__name__} "
                f"({views!r:.80}): wrap it in a list."
            )
        return self._scene_pixels(views, self._call_settings(kwargs))

    def _call_settings(self, overrides: G2VLMGeometryImagesKwargs) -> _ViewSettings:
        """One call's settings: `overrides` (checked) over the processor's own values."""
        unknown = sorted(set(overrides) - set(G2VLMGeometryImagesKwargs.__annotations__))
        if unknown:
            raise TypeError(
                f"The geometry image processor got unknown setting(s) {unknown}; it takes "
                f"{sorted(G2VLMGeometryImagesKwargs.__annotations__)}."
            )
        values = {name: getattr(self, name) for name in G2VLMGeometryImagesKwargs.__annotations__}
        values.update({name: value for name, value in overrides.items() if value is not None})
        values["image_mean"], values["image_std"] = (
            _per_channel(values["image_mean"]),
            _per_channel(values["image_std"]),
        )
        settings = _ViewSettings(**values)
        if not _is_count(settings.target_width) or settings.target_width % self.patch_size:
            raise ValueError(
                f"target_width={settings.target_width!r} must be a positive integer multiple of the patch size "
                f"{self.patch_size}."
            )
        if not _is_count(settings.max_views):
            raise ValueError(f"max_views must be a positive integer, got {settings.max_views!r}.")
        for name in ("image_mean", "image_std"):
            value = getattr(settings, name)
            if len(value) != 3 or (name == "image_std" and min(value) <= 0):
                raise ValueError(
                    f"{name} must be one number or three (R, G, B){', all positive' if name == 'image_std' else ''}, "
                    f"got {value}."
                )
        return settings

    def _scene_pixels(self, views: Sequence[ImageSource], settings: _ViewSettings) -> torch.Tensor:
        """`(views, 3, H, W)` normalised pixels of one scene under `settings`."""
        do_resize, target_width, max_views = settings.do_resize, settings.target_width, settings.max_views
        if len(views) == 0:
            raise ValueError("A scene needs at least one view.")
        if len(views) > max_views:
            raise ValueError(self._too_many_views_message(len(views), target_width, max_views))
        pil_views = [load_image(view) for view in views]
        self._check_not_too_small(pil_views)
        width, height = pil_views[0].size
        if do_resize:
            width, height = (
                target_width,
                max(1, round(height * target_width / width / self.patch_size)) * self.patch_size,
            )
        self._check_budget(pil_views[0].size, (width, height))
        if do_resize and not settings.resize_views_to_first:
            for index, view in enumerate(pil_views):
                if view.size != pil_views[0].size:
                    raise ValueError(
                        f"View {index} is {view.size[0]}x{view.size[1]} but the first view is "
                        f"{pil_views[0].size[0]}x{pil_views[0].size[1]}: all views of a scene are resized to the first "
                        "view's size. Crop them to one size, or opt in with resize_views_to_first=True on the "
                        "geometry image processor (--resize-views on the command line)."
                    )
        arrays = []
        for view in pil_views:
            if view.size != (width, height):
                if not do_resize:
                    raise ValueError(
                        f"With do_resize=False all views of a scene must share one size: got {view.size} and "
                        f"{pil_views[0].size}."
                    )
                view = view.resize((width, height), Image.Resampling.LANCZOS)
            arrays.append(np.asarray(view, dtype=np.uint8))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        patch = self.patch_size
        fitted = (max(patch, height // patch * patch), max(patch, width // patch * patch))
        if fitted != (height, width):
            pixels = F.interpolate(pixels, fitted, mode="bilinear", align_corners=False, antialias=True)
        if settings.do_normalize:
            mean = torch.tensor(settings.image_mean).view(1, 3, 1, 1)
            std = torch.tensor(settings.image_std).view(1, 3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def _check_not_too_small(self, views: Sequence[Image.Image]) -> None:
        """Refuse views smaller than one patch a side: upscaled to the working size they would reconstruct a blur."""
        for index, view in enumerate(views):
            if min(view.size) < self.patch_size:
                raise ValueError(
                    f"View {index} is {view.size[0]}x{view.size[1]} pixels, smaller than one {self.patch_size}x"
                    f"{self.patch_size} patch: it would be upscaled from almost nothing. Use images of at least "
                    f"{self.patch_size} pixels a side."
                )

    def _check_budget(self, original: tuple[int, int], resized: tuple[int, int]) -> None:
        """Refuse views whose aspect ratio or token count would make inference hang."""
        (width, height), (new_width, new_height) = original, resized
        tokens = (new_width // self.patch_size) * (new_height // self.patch_size)
        aspect = max(width / height, height / width)
        if aspect > self.max_aspect_ratio or tokens > self.max_tokens_per_view:
            raise ValueError(
                f"A {width}x{height} view (aspect {aspect:.1f}:1) becomes a {new_width}x{new_height} geometry view of "
                f"{tokens:,} tokens; the limits are aspect {self.max_aspect_ratio}:1 and {self.max_tokens_per_view:,} "
                "tokens per view. Crop the image (or, from Python, raise max_aspect_ratio / max_tokens_per_view on "
                "the geometry image processor if you have the memory)."
            )

    def unnormalize(self, geometry_pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 RGB `(..., H, W, 3)` images back from `geometry_pixel_values` `(..., 3, H, W)` (e.g. to colour points)."""
        pixels = geometry_pixel_values.float()
        if self.do_normalize:
            shape = (3, 1, 1)
            pixels = pixels * torch.tensor(self.image_std).view(shape) + torch.tensor(self.image_mean).view(shape)
        return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)

    def _too_many_views_message(self, num_views: int, target_width: int, max_views: int) -> str:
        tokens_per_view = (target_width // self.patch_size) ** 2 * 3 // 4  # a 4:3 view, as an order of magnitude
        tokens = num_views * tokens_per_view
        gigabytes = tokens * G2VLM_2B_KV_BYTES_PER_TOKEN / 1e9
        return (
            f"{num_views} views exceed max_views={max_views}. At width {target_width} a 4:3 view is about "
            f"{tokens_per_view} geometry tokens, so these views would put about {tokens:,} tokens in the prompt "
            f"(about {gigabytes:.0f} GB of key/value cache alone for G2VLM-2B in bfloat16, before activations). "
            "Subsample the views (e.g. every k-th video frame: --every / --max-views on the command line) or, from "
            "Python, raise max_views on the geometry image processor if you have the memory."
        )


def _is_count(value: object) -> bool:
    """Whether `value` is a positive integer (not a bool, a float or a string)."""
    return is_integer(value) and value > 0


def _per_channel(value: float | Sequence[float]) -> list[float]:
    """A mean or std as one float per RGB channel (a single number stands for all three)."""
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def as_scenes(images) -> list[list[ImageSource]]:
    """Normalise one view / a list of views / a list of scenes to a list of scenes."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("No geometry images were given: reconstruction needs at least one view.")
        if all(isinstance(scene, (list, tuple)) for scene in images):
            empty = [index for index, scene in enumerate(images) if len(scene) == 0]
            if empty:
                raise ValueError(f"Scene {empty[0]} of the geometry images has no views: give each scene at least one.")
            return [list(scene) for scene in images]
        if any(isinstance(scene, (list, tuple)) for scene in images):
            raise ValueError("Pass either the views of one scene or a list of scenes (lists of views), not a mix.")
        return [list(images)]
    return [[images]]


__all__ = ["G2VLMGeometryImageProcessor", "G2VLMGeometryImagesKwargs"]
