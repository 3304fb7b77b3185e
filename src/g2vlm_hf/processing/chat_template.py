"""The G²VLM chat template, reproducing the prompt layout of the official `chat_with_recon`:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
    [one geometry view per image of the turn] [one semantic image per image of the turn] question<|im_end|>\n
    <|im_start|>assistant\n

Each image of a user turn is used twice: all of them first as geometry views (one geometry block, the scene), then
each as a semantic image. Render with `geometry=False` to leave the geometry views out (plain Qwen2-VL layout).
Assistant replies and their closing `<|im_end|>` sit in a `{% generation %}` block, so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens a model is trained to write.
"""

from __future__ import annotations

from typing import Any

# The content items the template renders; a video item reaches the processor, which refuses videos. transformers
# turns an OpenAI-style {"type": "image_url", "image_url": {"url": ...}} item into an image item before rendering.
CONTENT_TYPES = ("text", "image", "video")

CHAT_TEMPLATE = (
    "{% macro render_content(content) %}"
    "{% if content is string %}"
    "{{ content }}"
    "{% else %}"
    "{% set images = content | selectattr('type', 'equalto', 'image') | list %}"
    "{% if geometry is not defined or geometry %}"
    "{% for image in images %}<|vision_start|><|geo_pad|><|vision_end|>{% endfor %}"
    "{% endif %}"
    "{% for image in images %}<|vision_start|><|image_pad|><|vision_end|>{% endfor %}"
    "{% for item in content if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render_content(message['content'] if message['content'] is defined else '') }}<|im_end|>"
    "{% endgeneration %}"
    "{% else %}"
    "{{ render_content(message['content'] if message['content'] is defined else '') }}<|im_end|>"
    "{% endif %}"
    "{{ '\\n' }}"  # an expression: transformers renders with trim_blocks, which drops a newline after a tag
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

RECONSTRUCTION_PROMPT = "<|im_start|>Reconstruct the 3D scene."


def check_chat_content(conversation: Any) -> None:
    """A ValueError for a content item the template would leave out of the prompt without a word (a type other than
    `CONTENT_TYPES` but for OpenAI's image_url items, e.g. `"images"`); `conversation` is one list of messages or a
    batch of them."""
    batch = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    for messages in batch:
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            for item in content if isinstance(content, (list, tuple)) else ():
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in CONTENT_TYPES and not (kind == "image_url" and "image_url" in item):
                    raise ValueError(
                        f"A {message.get('role', 'message')!r} content item has type {kind!r}, which the G2VLM chat "
                        "template does not render: use {'type': 'image', 'image': <PIL image, path or URL>} (or "
                        "'url' / 'path' for the image) and {'type': 'text', 'text': ...}."
                    )
