"""Numerical kernels every objective shares: token log-probs, entropy and their reductions."""

from rlalign.ops.logprobs import (
    masked_mean,
    reduce_loss,
    reduce_sequences,
    token_entropy,
    token_logprobs,
    token_nll,
)

__all__ = ["masked_mean", "reduce_loss", "reduce_sequences", "token_entropy", "token_logprobs", "token_nll"]
