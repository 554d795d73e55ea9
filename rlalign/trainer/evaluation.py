"""Validation during training, one sharded path for every kind of metric: the reference-caption NLL of caption
data (`val/loss`) and an objective's own loss and metrics on preference pairs (`val/<metric>`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlalign.ops import token_nll
from rlalign.ops.logprobs import label_window
from rlalign.runtime import Runtime
from rlalign.trainer.data import eval_shard
from rlalign.utils.tensors import model_inputs, to_device

Measure = Callable[[dict[str, Any], torch.Tensor], dict[str, tuple[float, float]]]
"""(batch on the device, per-row weights [B]) -> metric name -> (weighted sum, weighted count)."""


@torch.no_grad()
def evaluate_sharded(
    model, dataset, collate, runtime: Runtime, size: int, batch_size: int, measure: Measure
) -> dict[str, float]:
    """`val/<metric>` = (sum over ranks of weighted sums) / (sum of weighted counts) over `size` evenly spaced
    validation items. Every rank runs the same number of forwards (ZeRO-3 / FSDP2 forwards are collective);
    padding duplicates that even the shards out carry their share of weight only."""
    picks = [k * len(dataset) // size for k in range(min(size, len(dataset)))]
    idx, weights = eval_shard(len(picks), runtime.world_size, runtime.rank)
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    for start in range(0, len(idx), batch_size):
        rows = [dataset[picks[i]] for i in idx[start : start + batch_size]]
        w = torch.tensor(weights[start : start + batch_size], dtype=torch.float64)
        for name, (total, count) in measure(to_device(collate(rows), runtime.device), w).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count
    model.train(was_training)
    keys = sorted(sums)
    totals = runtime.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64).reshape(-1, 2))
    return {f"val/{k}": float(totals[i, 0] / totals[i, 1]) for i, k in enumerate(keys)}


def nll_measure(model, label_key: str = "labels") -> Measure:
    """Token NLL of the labelled positions (a row weighs by its weight times its token count)."""

    def measure(batch: dict[str, Any], w: torch.Tensor) -> dict[str, tuple[float, float]]:
        labels = batch[label_key]
        start = label_window(labels)
        logits = model(**model_inputs(batch, (label_key,)), logits_to_keep=labels.shape[1] - start).logits
        nll_BT, mask_BT = token_nll(logits, labels[:, start:])
        per_row = nll_BT.sum(1).double().cpu(), mask_BT.sum(1).double().cpu()
        return {"loss": (float((per_row[0] * w).sum()), float((per_row[1] * w).sum()))}

    return measure


def objective_measure(model, objective, reference: Any) -> Measure:
    """The objective's metrics, each a mean over the batch's items, weighted by the batch's real items."""

    def measure(batch: dict[str, Any], w: torch.Tensor) -> dict[str, tuple[float, float]]:
        _, metrics = objective.loss(
            model, batch, items_per_micro=objective.count_items(batch), reference=reference
        )
        weight = float(w.sum())
        return {k: (float(v) * weight, weight) for k, v in metrics.items()}

    return measure
