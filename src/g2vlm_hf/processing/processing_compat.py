"""How `ProcessorMixin.from_pretrained` builds a processor's components, on each transformers release g2vlm-hf runs on.

- 5.21 to 5.24: `get_processor_dict` -> `_get_arguments_from_pretrained` (the components, in `get_attributes()`
  order) -> `from_args_and_dict`.
- 5.25 on: `get_processor_dict` -> `_resolve_subprocessors` (the components put into the processor dict, user-given
  ones taken from the keyword arguments) -> `from_dict`; `_get_arguments_from_pretrained` is no longer called.

`SubprocessorLoading` implements both hooks on top of one classmethod, `_load_image_processors`, so that a processor
whose image processors are not where transformers would look for them (G²VLM saves its geometry image processor
as "image_processor", see `G2VLMProcessor`) loads the same on every release; the tokenizer is loaded as transformers
loads it.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin


class SubprocessorLoading(ProcessorMixin):
    """`ProcessorMixin` with both releases' loading hooks routed to `_load_image_processors` (the processor's base
    class in place of `ProcessorMixin`, so that the processor's parent still has every `ProcessorMixin` method)."""

    @classmethod
    def _load_image_processors(
        cls, processor_dict: dict[str, Any], given: dict[str, Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The image processors, by attribute name, from the saved `processor_dict` (whose entries for them this
        pops), skipping the attributes in `given` (passed to `from_pretrained` by the user); `kwargs` are the other
        keyword arguments of `from_pretrained`."""
        raise NotImplementedError

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # transformers 5.21 to 5.24: user-given components are swapped in afterwards by `from_args_and_dict`
        processor_dict = processor_dict if processor_dict is not None else {}
        subfolder = kwargs.pop("subfolder", "")
        given = {name: kwargs[name] for name in cls.get_attributes() if kwargs.get(name) is not None}
        components = {**given, **cls._load_image_processors(processor_dict, given, kwargs)}
        for name in cls.get_attributes():
            if name not in components and "tokenizer" in name:
                components[name] = cls._load_tokenizer_from_pretrained(
                    name, pretrained_model_name_or_path, subfolder=subfolder, **kwargs
                )
        return [components[name] for name in cls.get_attributes()]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        # transformers 5.25 on: the image processors go into the dict as objects, which transformers' own
        # `_resolve_subprocessors` keeps; it loads the tokenizer and takes the user-given components
        processor_dict = dict(processor_dict)
        given = {name: kwargs[name] for name in cls.get_attributes() if kwargs.get(name) is not None}
        processor_dict.update(cls._load_image_processors(processor_dict, given, kwargs))
        return super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)


__all__ = ["SubprocessorLoading"]
