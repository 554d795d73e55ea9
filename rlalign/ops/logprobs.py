"""Token log-probs from logits, one path for every objective.

`log p(t) = logit_t - logsumexp(logits)`, computed in row chunks with float32 accumulation: a chunk of
logits is upcast at a time, so no `[N, T, V]` float32 copy of the whole batch (or `[N, T, V]`
log-softmax) is ever held. Gradients flow through the same code.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 1024
"""Positions per chunk: at a 152k vocabulary a float32 chunk is ~620 MB."""


class _ChunkedLogProbs(torch.autograd.Function):
    """log p(target) per row of `logits` [M, V], chunk by chunk in float32. Saves only the logits (in their
    own dtype) and the float32 log-normaliser; backward recomputes each chunk's softmax:
    d logp / d logits = onehot(target) - softmax(logits)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk):
            rows = logits[start : start + chunk].to(acc)
            lse[start : start + chunk] = torch.logsumexp(rows, dim=-1)
            picked = rows.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
            out[start : start + chunk] = picked - lse[start : start + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            g = grad_out[start:stop, None].to(lse.dtype)
            # g * (onehot - softmax), in place: in `grad` itself at full precision, else in one temporary
            if grad.dtype == lse.dtype:
                part = grad[start:stop]
                part.copy_(logits[start:stop])
            else:
                part = logits[start:stop].to(lse.dtype, copy=True)
            part.sub_(lse[start:stop, None]).exp_().mul_(-g)
            part.scatter_add_(-1, targets[start:stop, None], g)
            if grad.dtype != lse.dtype:
                grad[start:stop] = part.to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Log-probs of `targets` [...] under `logits` [..., V] (temperature 1), in float32 (float64 for float64
    logits). Under autograd the backward holds no float32 copy of the logits either (`_ChunkedLogProbs`)."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if flat_logits.shape[0] == 0:
        return flat_logits.new_zeros(targets.shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    return _ChunkedLogProbs.apply(flat_logits, flat_targets, chunk).view(targets.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Entropy of each position's distribution [...] in float32 (float64 for float64 logits); a metric,
    no gradient."""
    flat = logits.reshape(-1, logits.shape[-1])
    acc = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for start in range(0, flat.shape[0], chunk):
        logp = flat[start : start + chunk].to(acc).log_softmax(-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    if not parts:
        return flat.new_zeros(logits.shape[:-1], dtype=acc)
    return torch.cat(parts).view(logits.shape[:-1])


def kept_positions(
    mask: torch.Tensor, pred_pos: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For `model(..., logits_to_keep=positions)`, so that logits exist only where a token is scored: the
    positions [N, K] whose logits predict the tokens `mask` [N, T] marks (K = the most marked tokens of a
    row), the index [N, K] of each such token, and which of the K slots are real (a row with fewer tokens
    repeats its last one). `pred_pos` [N, T] gives the position predicting each token (packed rows);
    default t - 1."""
    N, _ = mask.shape
    K = max(int(mask.sum(1).max()), 1)
    # a stable sort puts each row's marked tokens first, in order
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]
    counts = mask.sum(1, keepdim=True)
    slot = torch.arange(K, device=mask.device).expand(N, K)
    valid = slot < counts
    index = order.gather(1, torch.minimum(slot, (counts - 1).clamp(min=0)))
    positions = pred_pos.gather(1, index) if pred_pos is not None else (index - 1).clamp(min=0)
    return positions, index, valid


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


def token_nll(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL [B, T-1] of next-token prediction (0 where the label is `ignore_index`) and the mask of
    positions that count."""
    target = labels_BT[:, 1:]
    mask = target != ignore_index
    nll = -token_logprobs(logits_BTV[:, :-1], target.clamp(min=0))
    return nll * mask, mask


def label_window(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """First position whose logits any label needs (the position before the first labelled token of any
    row): `model(..., logits_to_keep=T - start)` then `token_nll(logits, labels[:, start:])` scores every
    label with no logits for the prompt and image tokens before it."""
    labelled = (labels[:, 1:] != ignore_index).any(0).nonzero()
    return int(labelled[0]) if len(labelled) else labels.shape[1] - 1
