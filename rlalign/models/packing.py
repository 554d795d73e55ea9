"""Which families pack preference rows, and the positions each packed segment gets.

A packed row is [prompt with image | response 1 | response 2]: both responses attend to the prompt and
to themselves (a 4D mask) and must see the positions the model itself gives the unpacked sequence
prompt + response. With 1-D RoPE (Llava, LLaVA-NeXT, Idefics3) that is the prompt's length onwards for
both responses. With M-RoPE (Qwen2-VL, Qwen2.5-VL) positions are 3-D (temporal, height, width) and an
image of h x w merged patches advances text positions by max(h, w), not by its token count, so they
come from the model's own `get_rope_index`, run once per response on the row with only prompt +
that response unmasked (its own logic, scattered into the packed layout).

The mask takes the form the language model's attention consumes: a dense (N,1,T,T) additive mask for
`sdpa` / `eager`, a `BlockMask` under `flex_attention` (transformers passes a 4-D mask, dense or block,
to the layers untouched). Under flex a dense mask would enter as a score_mod reading T*T floats; a
BlockMask skips the blocks no query of a block sees (a response's block never reads another response's),
and torch 2.13's compiled CPU kernel crashes on transformers' dense score_mod. Of the packing families,
Llava, LLaVA-NeXT and Idefics3 load with flex attention; Qwen2-VL and Qwen2.5-VL do not (transformers
5.x has no flex path for them; preflight refuses the combination). None passes the text mask to its
vision tower.

Families whose processors are not listed in `PACKED_PROCESSORS` (their attention is not plain causal
over a prompt, e.g. Gemma 3's bidirectional image blocks and PaliGemma's prefix-LM; or not checked here)
get unpacked rows instead: prompt + response per row, the image encoded once per response.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import (
    Idefics3Processor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
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


def visible(
    q_seg: torch.Tensor, kv_seg: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, prompt: int, pad: int
) -> torch.Tensor:
    """Whether query position `q` (segment `q_seg`) attends to key position `kv` (segment `kv_seg`) in a
    packed row: causal, the key in the prompt or in the query's own segment, not padding; every position
    sees itself (a padding row is not empty: no NaN). Elementwise, so one rule serves the dense mask
    (broadcast tensors) and the BlockMask's mask_mod (scalars)."""
    return ((q >= kv) & ((kv_seg == prompt) | (kv_seg == q_seg)) & (kv_seg != pad)) | (q == kv)


def packed_mask(
    segment_ids: torch.Tensor, dtype: torch.dtype, prompt: int = 0, pad: int = -1
) -> torch.Tensor:
    """(N,1,T,T) additive mask of packed rows (`visible`): 0 where seen, the dtype's minimum elsewhere."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device)
    allowed = visible(segment_ids[:, :, None], segment_ids[:, None, :], idx[:, None], idx, prompt, pad)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


BLOCK_SIZE = 128
"""flex attention's block (torch's default): the BlockMask's kernels read whole blocks."""


def packed_block_mask(segment_ids: torch.Tensor, prompt: int = 0, pad: int = -1) -> BlockMask:
    """The `BlockMask` of `packed_mask` for flex attention (N rows, heads broadcast, T x T). The mask_mod
    reads segment ids padded with `pad` to a whole number of blocks, so a kernel that evaluates the last
    partial block at indices >= T reads padding, not past the buffer."""
    N, T = segment_ids.shape
    seg = torch.nn.functional.pad(segment_ids, (0, -T % BLOCK_SIZE), value=pad)

    def mask_mod(b, h, q, kv):
        return visible(seg[b, q], seg[b, kv], q, kv, prompt, pad)

    return create_block_mask(mask_mod, N, None, T, T, device=segment_ids.device, BLOCK_SIZE=BLOCK_SIZE)


def attention_implementation(model: Any) -> str:
    """The attention kernel of `model`'s language model (under any wrapper: DDP, DeepSpeed, PEFT, the
    reference handle): the first transformers model of the tree is the root, its text config the LM's."""
    root = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    return root.config.get_text_config()._attn_implementation


def packed_attention_mask(
    model: Any, segment_ids: torch.Tensor, dtype: torch.dtype, prompt: int = 0, pad: int = -1
) -> torch.Tensor | BlockMask:
    """The mask of packed rows in the form `model`'s attention takes: a BlockMask under flex attention,
    the dense additive (N,1,T,T) mask otherwise."""
    if attention_implementation(model) == "flex_attention":
        return packed_block_mask(segment_ids, prompt, pad)
    return packed_mask(segment_ids, dtype, prompt, pad)


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
