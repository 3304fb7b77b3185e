"""The G²VLM chat template, reproducing the prompt layout of the official `chat_with_recon`:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
    [one geometry view per image of the turn] [one semantic image per image of the turn] question<|im_end|>\n
    <|im_start|>assistant\n

Each image of a user turn is used twice: all of them first as geometry views (one geometry block, the scene), then
each as a semantic image. Render with `geometry=False` to leave the geometry views out (plain Qwen2-VL layout).
Assistant replies and their closing `<|im_end|>` sit in a `{% generation %}` block, so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens a model is trained to write.
"""

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
