"""One-turn spatial questions, as the command line, the demo and the evaluation ask them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def answer(
    model,
    processor,
    images: Sequence,
    question: str,
    max_new_tokens: int,
    streamer=None,
    **processor_kwargs: Any,
) -> str:
    """The model's greedy answer to `question` about `images` (paths, URLs or PIL images). Each image enters as a
    geometry view and as a semantic image, the official chat layout, so the scene's geometry is in the context while
    the model answers. A `streamer` (e.g. transformers' `TextStreamer`) gets the tokens as they come;
    `processor_kwargs` (e.g. `target_width=...`, `resize_views_to_first=True`) go to the processor for this call."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    ).to(model.device)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
