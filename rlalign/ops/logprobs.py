"""Token log-probs from logits, one path for every objective.

`log p(t) = logit_t - logsumexp(logits)`, computed in row chunks with float32 accumulation: a chunk of
logits is upcast at a time, so no `[N, T, V]` float32 copy of the whole batch (or `[N, T, V]`
log-softmax) is ever held. Gradients flow through the same code.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024
"""Positions per chunk: at a 152k vocabulary a float32 chunk is ~620 MB."""


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Float32 log-probs of `targets` [...] under `logits` [..., V] (temperature 1)."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1, 1)
    parts = []
    for start in range(0, flat_logits.shape[0], chunk):
        rows = flat_logits[start : start + chunk].float()
        picked = rows.gather(-1, flat_targets[start : start + chunk]).squeeze(-1)
        parts.append(picked - torch.logsumexp(rows, dim=-1))
    if not parts:
        return flat_logits.new_zeros(targets.shape, dtype=torch.float32)
    return torch.cat(parts).view(targets.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Float32 entropy of each position's distribution [...] (a metric: no gradient)."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], chunk):
        logp = flat[start : start + chunk].float().log_softmax(-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    if not parts:
        return flat.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(parts).view(logits.shape[:-1])


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` holds, over `dim` (all positions when None; 0 where nothing counts)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def reduce_sequences(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sequence `sum` or `mean` of token values [N, T] over the positions `mask` marks."""
    if reduction == "sum":
        return (values * mask.to(values.dtype)).sum(-1)
    if reduction == "mean":
        return masked_mean(values, mask, dim=-1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, normalize: str) -> torch.Tensor:
    """Sum over the micro-batch of per-token losses (`token`) or of per-sequence means (`sequence`): the
    numerator the step's item count (tokens or sequences) divides."""
    if normalize == "token":
        return reduce_sequences(per_token, mask, "sum").sum()
    if normalize == "sequence":
        return reduce_sequences(per_token, mask, "mean").sum()
    raise ValueError(f"normalize must be 'token' or 'sequence', got {normalize!r}")


def token_nll(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [B, T-1] of next-token prediction (0 where the label is `ignore_index`) and the mask of
    positions that count."""
    target = labels_BT[:, 1:]
    mask = target != ignore_index
    nll = -token_logprobs(logits_BTV[:, :-1], target.clamp(min=0))
    return nll * mask, mask
