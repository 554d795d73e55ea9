"""Advantage estimators, apart from the losses: rewards in, one advantage per sample out.

Samples of one image are contiguous (row b*G + g is sample g of image b), so groups are rows of a
[B, G] view. Everything runs in the rewards' dtype (float64 from the caption metrics).
"""

from __future__ import annotations

import torch


def group_normalized(
    rewards_N: torch.Tensor, group_size: int, *, eps: float = 1e-5, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO: (r - mean_g) / (std_g + eps), with the unbiased (sample) std as TRL; NaN becomes 0."""
    r_BG = rewards_N.view(-1, group_size)
    centred = r_BG - r_BG.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (r_BG.std(1, keepdim=True) + eps)
    return torch.nan_to_num(centred, nan=0.0).view(-1)


def greedy_baseline(rewards_N: torch.Tensor, greedy_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """SCST (Rennie et al.): r(sample) - r(greedy decode of the same image)."""
    return (rewards_N.view(-1, group_size) - greedy_B.view(-1, 1)).view(-1)


def leave_one_out(rewards_N: torch.Tensor, group_size: int) -> torch.Tensor:
    """SCST with the mean reward of the image's other samples as baseline (needs G >= 2)."""
    if group_size < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per image")
    r_BG = rewards_N.view(-1, group_size)
    others = (r_BG.sum(1, keepdim=True) - r_BG) / (group_size - 1)
    return (r_BG - others).view(-1)


def zero_std_share(rewards_N: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (they carry no GRPO signal)."""
    r_BG = rewards_N.view(-1, group_size)
    return float((r_BG.max(1).values == r_BG.min(1).values).double().mean())
