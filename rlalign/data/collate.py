"""Collation for any HF VLM: the processor builds the prompt (image tokens expanded), the response
tokens are appended after it, so truncation only ever cuts the response, never image tokens.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100
# Processor outputs with one value per prompt token, and the value a response token gets.
# Qwen2-VL / Qwen2.5-VL: `mm_token_type_ids` marks image (1) and video (2) tokens for M-RoPE;
# Gemma 3: `token_type_ids` marks image (1) tokens, which attend to each other both ways.
TOKEN_ALIGNED = {"mm_token_type_ids": 0, "token_type_ids": 0}


SENTINEL = "\x00rlalign-prompt\x00"
"""Text that no prompt holds: rendered through a chat template, it shows what the template puts around a prompt."""


def message_text(messages: list[dict]) -> str:
    """The text of chat messages (TRL's format: `content` a string or a list of parts such as
    `{"type": "text", "text": ...}`), concatenated; image parts carry no text."""
    out = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, str):
            out.append(content)
        else:
            out += [part.get("text", "") for part in content if part.get("type") == "text"]
    return "".join(out)


def image_slots(messages: list[dict]) -> int:
    """How many `{"type": "image"}` parts the messages hold."""
    return sum(
        1
        for m in messages
        if not isinstance(m.get("content", ""), str)
        for part in m["content"]
        if part.get("type") == "image"
    )


def with_images(messages: list[dict], n_images: int) -> list[dict]:
    """The messages with string contents as text parts and, when they hold no image part, `n_images` image
    parts at the start of the first user message (as TRL's `prepare_multimodal_messages`)."""
    out = [
        {
            **m,
            "content": [{"type": "text", "text": m["content"]}]
            if isinstance(m["content"], str)
            else m["content"],
        }
        for m in messages
    ]
    if n_images and not image_slots(out):
        first = next((i for i, m in enumerate(out) if m["role"] == "user"), 0)
        out[first] = {**out[first], "content": [{"type": "image"}] * n_images + list(out[first]["content"])}
    return out


def _template_parts(processor: Any) -> tuple[str, str]:
    """(image placeholder, generation tail) of the processor's chat template: what it renders for one image
    part, and what follows the user's text up to where the answer starts."""
    with_image = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SENTINEL}]}],
        add_generation_prompt=True,
    )
    text_only = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": SENTINEL}]}], add_generation_prompt=True
    )
    head, tail = with_image.split(SENTINEL)
    placeholder = head[len(text_only.split(SENTINEL)[0]) :]
    return placeholder.strip(), tail.strip()


def is_templated(processor: Any, prompt: str) -> bool:
    """Whether a string prompt is already rendered for the model: it holds the family's image placeholder
    (the chat template's, e.g. `<|vision_start|><|image_pad|><|vision_end|>`, or the processor's image token
    when there is no template) or ends with the template's generation prompt (e.g. `ASSISTANT:`)."""
    if not getattr(processor, "chat_template", None):
        return processor.image_token in prompt
    placeholder, tail = _template_parts(processor)
    return bool(placeholder and placeholder in prompt) or bool(tail and prompt.rstrip().endswith(tail))


def prompt_text(processor: Any, prompt: str | list[dict], n_images: int = 1) -> str:
    """The prompt as the model family expects it, for a row with `n_images` images: chat messages go through
    the chat template (image parts added when they have none); a plain string gets the template around it
    (or `<image>` x n + text without one), unless it is already rendered (`is_templated`): then as is."""
    if isinstance(prompt, str) and prompt and is_templated(processor, prompt):
        return prompt
    messages = (
        [{"role": "user", "content": [{"type": "text", "text": prompt}] if prompt else []}]
        if isinstance(prompt, str)
        else prompt
    )
    messages = with_images(messages, n_images)
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return "".join(
        processor.image_token if part["type"] == "image" else part.get("text", "")
        for m in messages
        for part in m["content"]
    )


def image_list(images: Any) -> list:
    """A row's images as a list (a row holds one image, or a list of them)."""
    return list(images) if isinstance(images, list | tuple) else [images]


def encode_prompts(
    processor: Any, images: list, prompts: list[str | list[dict]], *, padding_side: str = "left"
) -> dict:
    """Processor output for the prompts alone (pixel values and image-token-expanded ids). `images[i]` is
    row i's image or list of images; `prompts[i]` a string or chat messages (see `prompt_text`)."""
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = padding_side
    try:
        per_row = [image_list(im) for im in images]
        texts = [prompt_text(processor, p, len(ims)) for p, ims in zip(prompts, per_row)]
        return processor(text=texts, images=per_row, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old


class SFTCollator:
    """Rows with `image`, `prompt`, `response` -> input_ids, attention_mask, labels, pixel inputs.

    Labels are the response tokens (plus EOS); prompt, image and padding positions are IGNORE.
    """

    def __init__(self, processor: Any, max_response_tokens: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.max_response_tokens = max_response_tokens

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        enc = encode_prompts(self.processor, [r["image"] for r in rows], [r["prompt"] for r in rows])
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        responses = self.tok([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
        seqs, labels = [], []
        for p, r in zip(prompt_ids, responses):
            r = r[: self.max_response_tokens] + [self.tok.eos_token_id]
            seqs.append(p + r)
            labels.append([IGNORE] * len(p) + r)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": right_pad(seqs, width, pad),
            "attention_mask": right_pad([[1] * len(s) for s in seqs], width, 0),
            "labels": right_pad(labels, width, IGNORE),
        }
        for key, value in enc.items():
            if key in ("input_ids", "attention_mask"):
                continue
            if key in TOKEN_ALIGNED:
                # Re-aligned like input_ids: the prompt's values, then the response's, then padding.
                rows = [v[m.bool()].tolist() for v, m in zip(value, enc["attention_mask"])]
                fill = TOKEN_ALIGNED[key]
                rows = [row + [fill] * (len(s) - len(row)) for row, s in zip(rows, seqs)]
                value = right_pad(rows, width, fill)
            elif isinstance(value, torch.Tensor) and value.shape == enc["input_ids"].shape:
                raise ValueError(
                    f"processor output '{key}' has one value per prompt token: add it to TOKEN_ALIGNED"
                )
            batch[key] = value
        return batch


def right_pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])
