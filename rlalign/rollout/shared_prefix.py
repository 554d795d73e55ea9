"""Shared-prefix rows for the GRPO / SCST forwards: one row per group, `[prompt | c1 | ... | cG]`.

In the unpacked buffer each image and prompt are repeated G times, so at COCO-like shapes (~600 prompt
tokens with 576 image tokens, ~16-token captions, G = 5) nearly all of an update's work recomputes the
same prompt. A packed row holds the prompt once and the group's completions after it: completion g
attends to the prompt and to itself (`packed_attention_mask`, the segment machinery of DPO's packed pairs) and
gets the positions the model gives the unpacked sequence prompt + completion g (1-D: prompt length
onwards; M-RoPE: the model's own `get_rope_index`, `segment_positions`). Logits exist only where a
completion token is scored, and the log-probs come back in the unpacked layout [B*G, L], so the
objectives' losses do not know which layout ran.

Segment ids: prompt 0, completion g (0-based) g + 1, padding (the prompt's left padding, a completion's
tokens after its end) -1.
"""

from __future__ import annotations

from typing import Any

import torch

from rlalign.data.collate import TOKEN_ALIGNED
from rlalign.models.packing import packed_attention_mask, packs_preferences, segment_positions
from rlalign.ops import token_entropy, token_logprobs
from rlalign.ops.logprobs import kept_positions

PAD, PROMPT = -1, 0
PACKED_KEYS = ("segment_ids", "pred_pos", "group_size", "prompt_len")
"""Keys of a packed buffer micro-batch that are not the forward's inputs as they stand."""


def supports_shared_prefix(processor: Any, attn_implementation: str) -> bool:
    """Whether the family's packed forward equals its unpacked one (the families DPO packs, tested per
    family) and the attention takes a 4-D mask: dense under sdpa / eager, a BlockMask under flex attention
    (not flash-attention 2's varlen path)."""
    return packs_preferences(processor) and attn_implementation != "flash_attention_2"


def pack_groups(
    model: Any, batch: dict[str, Any], comp: torch.Tensor, mask: torch.Tensor, group: int
) -> dict[str, Any]:
    """The packed micro-batch of a rollout: `batch` holds B prompts (left-padded, their image inputs once),
    `comp` / `mask` [B*G, L] the completions in group order. Returns B rows of P + G*L tokens with
    `segment_ids`, `pred_pos` (the position whose logits predict each token), `position_ids` (1-D, or
    M-RoPE from `model`'s rope index, computed here once for every forward of the buffer), the
    prompt-aligned inputs extended over the completions, `completion_mask` [B*G, L]."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    B, P = ids.shape
    L = comp.shape[1]
    if comp.shape[0] != B * group:
        raise ValueError(f"{comp.shape[0]} completions for {B} prompts x group {group}")
    dev = ids.device
    out: dict[str, Any] = {
        k: v
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")
    }
    for key, fill in TOKEN_ALIGNED.items():
        if key in out and out[key].shape[1] == P:
            out[key] = torch.cat([out[key], out[key].new_full((B, group * L), fill)], 1)
    out["input_ids"] = torch.cat([ids, comp.reshape(B, group * L)], 1)
    out["attention_mask"] = torch.cat([att, mask.reshape(B, group * L).to(att.dtype)], 1)
    g = torch.arange(1, group + 1, device=dev).repeat_interleave(L).expand(B, -1)
    seg_c = torch.where(mask.reshape(B, group * L).bool(), g, torch.full_like(g, PAD))
    seg_p = torch.where(att.bool(), torch.full_like(ids, PROMPT), torch.full_like(ids, PAD))
    out["segment_ids"] = torch.cat([seg_p, seg_c], 1)
    j = torch.arange(L, device=dev).repeat(group)  # offset inside the completion
    start = P + torch.arange(group, device=dev).repeat_interleave(L) * L  # packed index of c_g[0]
    pred_c = torch.where(j == 0, torch.full_like(j, P - 1), start + j - 1)
    out["pred_pos"] = torch.cat([torch.arange(P, device=dev) - 1, pred_c]).clamp(min=0).expand(B, -1).clone()
    out["position_ids"] = torch.cat([torch.arange(P, device=dev), P + j]).expand(B, -1).clone()
    mrope = segment_positions(model, out, PROMPT, range(1, group + 1))
    if mrope is not None:
        out["position_ids"] = mrope
    out["completion_mask"] = mask
    out["group_size"] = group
    out["prompt_len"] = P
    return out


def packed_completion_logprobs(
    model: Any, batch: dict[str, Any], *, entropy: bool = False, drop: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B*G, L] (float32) of a packed micro-batch's completion tokens, and their entropy: one
    forward over the B packed rows, logits only at the positions that predict a completion token."""
    seg = batch["segment_ids"]
    G, P = batch["group_size"], batch["prompt_len"]
    mask = batch["completion_mask"]
    L = mask.shape[1]
    positions, index, valid = kept_positions(seg > PROMPT, batch["pred_pos"])
    inputs = {
        k: v
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and k not in PACKED_KEYS and k not in drop
    }
    dtype = next(
        p.dtype for m in model.modules() for p in m.parameters(recurse=False) if p.dtype.is_floating_point
    )
    inputs["attention_mask"] = packed_attention_mask(model, seg, dtype, PROMPT, PAD)
    logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits  # (B, K, V)
    logp_BK = token_logprobs(logits, batch["input_ids"].gather(1, index))
    ent_BK = token_entropy(logits) if entropy else None
    # back to the unpacked layout: packed index P + g*L + j is completion (b, g), token j
    B = seg.shape[0]
    rel = index - P
    flat = (torch.arange(B, device=seg.device)[:, None] * G + rel // L) * L + rel % L
    flat, keep = flat[valid], valid

    def unpack(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(B * G * L)
        out = out.index_put((flat,), values[keep])
        return out.view(B * G, L)

    return unpack(logp_BK), unpack(ent_BK) if ent_BK is not None else None
