"""The `images` data kind of the RL objectives: one row per image, collated to prompt encodings.

A row holds the image, its id, all its reference captions and (shapes world) its ground-truth
objects; the collator encodes the prompts (left-padded, ready for `generate`) and passes the ids,
references and objects on as lists for the rewards. Validation keeps the reference-caption NLL of
`xe`: rows that carry a `response` (the `CaptionPairs` view) are collated for it.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from torch.utils.data import Dataset as TorchDataset

from rlalign.data.collate import SFTCollator, encode_prompts


class ImageRows(TorchDataset):
    def __init__(self, images: Dataset, prompt: str = ""):
        self.images, self.prompt = images, prompt

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.images[i])
        caps = row["captions"]
        row["captions"] = caps if isinstance(caps, list) else [caps]
        row["prompt"] = self.prompt
        return row


class PromptCollator:
    """Image rows -> input_ids, attention_mask, pixel inputs (prompts only) + image_ids, refs, objects."""

    def __init__(self, processor: Any, max_response_tokens: int):
        self.processor = processor
        self.sft = SFTCollator(processor, max_response_tokens)

    def __call__(self, rows: list[dict]) -> dict:
        if "response" in rows[0]:
            return self.sft(rows)
        batch = dict(encode_prompts(self.processor, [r["image"] for r in rows], [r["prompt"] for r in rows]))
        batch["image_ids"] = [r["image_id"] for r in rows]
        batch["refs"] = [r["captions"] for r in rows]
        if "objects" in rows[0]:
            batch["objects"] = [r["objects"] for r in rows]
        return batch
