"""Validation for objectives whose data is not captions (preference pairs): the objective's own loss
and metrics (rewards, margins, accuracies) on the validation set, sharded over ranks."""

from __future__ import annotations

from typing import Any

import torch

from rlalign.trainer.data import eval_shard
from rlalign.runtime import Runtime


@torch.no_grad()
def evaluate_objective(model, objective, dataset, collate, runtime: Runtime, reference: Any, size: int,
                       batch_size: int) -> dict[str, float]:  # fmt: skip
    """`val/<metric>` means over `size` validation items. Every rank runs the same number of forwards
    (ZeRO-3 / FSDP2 forwards are collective); a batch's metrics weigh by its real (non-padding) items,
    so a batch mixing real and padding items counts its padding duplicates at their share."""
    picks = [k * len(dataset) // size for k in range(min(size, len(dataset)))]
    idx, weights = eval_shard(len(picks), runtime.world_size, runtime.rank)
    model.eval()
    sums: dict[str, float] = {}
    weight = 0.0
    for start in range(0, len(idx), batch_size):
        rows = [dataset[picks[i]] for i in idx[start : start + batch_size]]
        w = sum(weights[start : start + batch_size])
        batch = {
            k: v.to(runtime.device) if isinstance(v, torch.Tensor) else v for k, v in collate(rows).items()
        }
        _, metrics = objective.loss(
            model, batch, items_per_micro=objective.count_items(batch), reference=reference
        )
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        weight += w
    model.train()
    keys = sorted(sums)
    totals = runtime.all_reduce(torch.tensor([sums[k] for k in keys] + [weight], dtype=torch.float64))
    return {f"val/{k}": float(totals[i] / totals[-1]) for i, k in enumerate(keys)}
