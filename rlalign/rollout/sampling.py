"""Sampling G completions per image (and a greedy decode) with seeds per image and sample.

Reproducible across layouts: the token of row (image, sample) is drawn by the Gumbel-max trick
from a generator seeded with (run seed, rollout index, image id, sample index), never from the
rank's global RNG, so 2 ranks x 2 images draw what 1 rank x 4 images draws. Each image is
encoded once per group: `generate(..., num_return_sequences=G)` in transformers 5.x runs the
vision encoder on the B images before expanding the features to the B x G rows (checked for
Llava: the same tokens as generating from G-times-repeated pixel values).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from rlalign.config.schema import RolloutConfig


def row_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class SeededSampler(LogitsProcessor):
    """Picks row i's next token with its own generator; returns scores that are 0 at the pick, -inf elsewhere,
    so that whatever `generate` does next (greedy or multinomial) takes exactly that token."""

    def __init__(self, seeds: list[int], cfg: RolloutConfig, banned: list[int]):
        self.seeds, self.cfg, self.banned = seeds, cfg, banned
        self.gens: list[torch.Generator] = []

    def _banned(self, device: torch.device) -> torch.Tensor:
        if not isinstance(self.banned, torch.Tensor) or self.banned.device != device:
            self.banned = torch.as_tensor(self.banned, dtype=torch.long, device=device)
        return self.banned

    def _generators(self, device: torch.device) -> list[torch.Generator]:
        """One generator per row on the scores' device (CUDA's is counter-based Philox): the noise is drawn
        where the scores are, nothing crosses between host and device per token."""
        if not self.gens:
            self.gens = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return self.gens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = scores.double() / self.cfg.temperature
        s[:, self._banned(s.device)] = float("-inf")
        if self.cfg.top_k:
            s = TopKLogitsWarper(self.cfg.top_k, filter_value=float("-inf"))(input_ids, s)
        if self.cfg.top_p < 1:
            s = TopPLogitsWarper(self.cfg.top_p, filter_value=float("-inf"))(input_ids, s)
        u = torch.stack(
            [
                torch.rand(s.shape[1], generator=g, dtype=torch.float64, device=s.device)
                for g in self._generators(s.device)
            ]
        )
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        pick = (s + gumbel).argmax(-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), pick] = 0.0
        return out


def banned_tokens(tokenizer: Any) -> list[int]:
    """Special tokens a completion never contains (image placeholders, padding, chat markers...): all but
    EOS. Added tokens marked special count too: a tokenizer need not name its image or vision-start token
    among its special-token roles, and a sampled one would make the sequence claim an image it lacks."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(special - {tokenizer.eos_token_id})


def generation_inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def sample_groups(
    model: torch.nn.Module, batch: dict, seeds: list[int], group_size: int, cfg: RolloutConfig, tokenizer: Any
) -> torch.Tensor:
    """Completion ids [B*G, L] (row b*G + g: sample g of image b), padded after EOS."""
    inputs = generation_inputs(batch)
    out = model.generate(
        **inputs,
        do_sample=True,
        num_return_sequences=group_size,
        temperature=1.0,
        top_k=None,
        top_p=1.0,
        logits_processor=LogitsProcessorList([SeededSampler(seeds, cfg, banned_tokens(tokenizer))]),
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[:, inputs["input_ids"].shape[1] :]


@torch.no_grad()
def greedy(model: torch.nn.Module, batch: dict, cfg: RolloutConfig, tokenizer: Any) -> torch.Tensor:
    inputs = generation_inputs(batch)
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=cfg.max_new_tokens,
        suppress_tokens=banned_tokens(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[:, inputs["input_ids"].shape[1] :]


def completion_mask(ids_NL: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on the tokens up to and including the first EOS (all of them when there is none)."""
    is_eos = ids_NL == eos_id
    before = is_eos.cumsum(1) - is_eos.long()  # EOS seen strictly before this position
    return (before == 0).long()
