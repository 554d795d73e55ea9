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


def prompt_text(processor: Any, prompt: str) -> str:
    """The prompt as the model family expects it: its chat template when it has one, else `<image>` + text."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
    return processor.image_token + prompt


def encode_prompts(processor: Any, images: list, prompts: list[str], *, padding_side: str = "left") -> dict:
    """Processor output for the prompts alone (pixel values and image-token-expanded ids)."""
    tok = processor.tokenizer
    old = tok.padding_side
    tok.padding_side = padding_side
    try:
        texts = [prompt_text(processor, p) for p in prompts]
        return processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True)
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
