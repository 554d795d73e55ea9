"""The one log-prob path (`rlalign.ops`): chunked log-probs equal the full log-softmax in float64, values and
gradients; entropy likewise; the kept positions select exactly the predicting positions."""

from __future__ import annotations

import pytest
import torch

from rlalign.ops import token_entropy, token_logprobs
from rlalign.ops.logprobs import kept_positions


def reference_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_logprobs_and_gradients_equal_full_log_softmax_float64(chunk):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 50, (2, 7), generator=g)
    targets[0, :3] = 5  # repeated targets: the scatter must add, not overwrite
    weights = torch.randn(2, 7, generator=g, dtype=torch.float64)
    ours = token_logprobs(logits, targets, chunk=chunk)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = reference_logprobs(logits, targets)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-12, rtol=0)


def test_low_precision_logits_accumulate_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3000, generator=g) * 3
    targets = torch.randint(0, 3000, (5,), generator=g)
    ours = token_logprobs(logits.bfloat16(), targets, chunk=2)
    exact = reference_logprobs(logits.bfloat16().double(), targets)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), exact, atol=1e-5, rtol=0)
    # a bfloat16 log-softmax (no float32 accumulation) is off by far more
    assert (reference_logprobs(logits.bfloat16(), targets).double() - exact).abs().max() > 1e-3


def test_entropy_equals_full_computation():
    logits = torch.randn(3, 4, 20, dtype=torch.float64)
    p = logits.softmax(-1)
    assert torch.allclose(token_entropy(logits, chunk=5), -(p * p.log()).sum(-1), atol=1e-12, rtol=0)


def test_kept_positions_pick_each_rows_marked_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    positions, index, valid = kept_positions(mask)
    assert index.tolist() == [[2, 3, 4], [4, 5, 5]]  # the short row repeats its last token...
    assert valid.tolist() == [[True, True, True], [True, True, False]]  # ...which does not count
    assert positions.tolist() == [[1, 2, 3], [3, 4, 4]]  # position t - 1 predicts token t
    pred_pos = torch.tensor([[0, 0, 7, 8, 9, 0], [0, 0, 0, 0, 6, 2]])
    assert kept_positions(mask, pred_pos)[0].tolist() == [[7, 8, 9], [6, 2, 2]]


def test_label_window_keeps_every_labelled_position():
    """XE's NLL from the kept logits equals the NLL from all logits (rows with different prompt lengths)."""
    from rlalign.ops import token_nll
    from rlalign.ops.logprobs import label_window

    labels = torch.tensor([[-100, -100, -100, 4, 5, -100], [-100, -100, 3, 1, 2, 7]])
    logits = torch.randn(2, 6, 9, dtype=torch.float64)
    start = label_window(labels)
    assert start == 1  # position 1 predicts row 1's first label (position 2)
    full, full_mask = token_nll(logits, labels)
    kept, kept_mask = token_nll(logits[:, start:], labels[:, start:])
    assert torch.equal(full_mask[:, start:], kept_mask) and not full_mask[:, :start].any()
    assert torch.allclose(full[:, start:], kept, atol=0, rtol=0)


def test_low_precision_gradient_matches_float64():
    """The bfloat16 backward (float32 temporary, cast back) equals the float64 gradient to bfloat16 rounding."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 300, generator=g, dtype=torch.float64) * 3
    targets = torch.tensor([1, 1, 7, 299])
    low = base.bfloat16().requires_grad_()
    (grad_low,) = torch.autograd.grad(token_logprobs(low, targets, chunk=3).sum(), low)
    exact = base.bfloat16().double().requires_grad_()
    (grad_exact,) = torch.autograd.grad(reference_logprobs(exact, targets).sum(), exact)
    assert grad_low.dtype == torch.bfloat16
    assert torch.allclose(grad_low.double(), grad_exact, atol=4e-3, rtol=1e-2)
