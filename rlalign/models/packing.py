"""Which families pack preference rows, and the positions each packed segment gets.

A packed row is [prompt with image | response 1 | response 2]: both responses attend to the prompt and
to themselves (a 4D mask) and must see the positions the model itself gives the unpacked sequence
prompt + response. With 1-D RoPE (Llava, LLaVA-NeXT, Idefics3) that is the prompt's length onwards for
both responses. With M-RoPE (Qwen2-VL, Qwen2.5-VL) positions are 3-D (temporal, height, width) and an
image of h x w merged patches advances text positions by max(h, w), not by its token count, so they
come from the model's own `get_rope_index`, run once per response on the row with only prompt +
that response unmasked (its own logic, scattered into the packed layout).

Families whose processors are not listed in `PACKED_PROCESSORS` (their attention is not plain causal
over a prompt, e.g. Gemma 3's bidirectional image blocks and PaliGemma's prefix-LM; or not checked here)
get unpacked rows instead: prompt + response per row, the image encoded once per response.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    Idefics3Processor,
    LlavaNextProcessor,
    LlavaProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)

log = logging.getLogger(__name__)

PACKED_PROCESSORS: tuple[type, ...] = (
    LlavaProcessor,
    LlavaNextProcessor,
    Idefics3Processor,
    Qwen2VLProcessor,
    Qwen2_5_VLProcessor,
)
"""Families whose packed log-probs equal their unpacked forward (tests/test_families.py checks each)."""

ROPE_INDEX_INPUTS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
"""Batch inputs `get_rope_index` reads besides input_ids and mm_token_type_ids."""


def packs_preferences(processor: Any) -> bool:
    """Whether preference pairs of this processor's family are packed into one row (else unpacked)."""
    return isinstance(processor, PACKED_PROCESSORS)


def rope_index_owner(model: Any) -> torch.nn.Module:
    """The module of `model` (under any wrapper: DDP, DeepSpeed, PEFT, the reference handle) that
    computes the family's M-RoPE positions."""
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    raise ValueError(
        f"{type(model).__name__}: the batch has 'mm_token_type_ids' (M-RoPE) but the model has no get_rope_index"
    )


def packed_mask(
    segment_ids: torch.Tensor, dtype: torch.dtype, prompt: int = 0, pad: int = -1
) -> torch.Tensor:
    """(N,1,T,T) additive mask of packed rows: causal, and each response segment sees the prompt and itself,
    no other response; `pad` positions are seen by none (a padding row sees only itself: no NaN)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = causal & ((k == prompt) | (k == q)) & (k != pad)
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


def segment_positions(
    model: Any, batch: dict[str, Any], prompt: int, responses: Sequence[int]
) -> torch.Tensor | None:
    """(3, N, T) M-RoPE position ids of a packed batch, or None when the family uses the batch's 1-D ones.

    Each response segment's positions are those `get_rope_index` gives the row with only the prompt and
    that response unmasked, which is the unpacked sequence prompt + response; padding gets 0."""
    if "mm_token_type_ids" not in batch:
        return None
    owner = rope_index_owner(model)
    seg = batch["segment_ids"]
    extra = {k: batch[k] for k in ROPE_INDEX_INPUTS if k in batch}
    out = None
    for response in responses:
        mask = ((seg == prompt) | (seg == response)).long()
        pos, _ = owner.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], attention_mask=mask, **extra
        )
        out = pos if out is None else torch.where(seg == response, pos, out)
    return out
