"""`xe`: cross-entropy on reference captions / responses (the warm start of every RL run).

Departure from a plain HF `labels=` forward: the loss is summed here and divided by the step's
token (or sequence) count over all micro-batches and ranks, so gradient accumulation and data
parallelism give exactly the single-batch gradient (HF's per-micro-batch mean does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from rlalign.data.collate import IGNORE
from rlalign.objectives.base import ObjectiveBase, register_objective
from rlalign.ops import token_nll
from rlalign.ops.logprobs import label_window
from rlalign.utils.tensors import model_inputs

OBJECTIVE_KEYS = ("labels",)
"""Batch tensors the loss reads and the model's forward does not take."""


@dataclass(kw_only=True)
class XEConfig:
    """Cross-entropy on reference captions."""

    normalize: Literal["token", "sequence"] = "token"
    """`token`: mean over all response tokens of the optimizer step; `sequence`: mean of per-caption means."""


@register_objective
class XEObjective(ObjectiveBase):
    name: ClassVar[str] = "xe"
    config_class: ClassVar[type] = XEConfig
    data_kind: ClassVar[str] = "captions"
    cfg: XEConfig

    def count_items(self, batch: dict[str, torch.Tensor]) -> float:
        if self.cfg.normalize == "token":
            return float((batch["labels"][:, 1:] != IGNORE).sum())
        return float(batch["labels"].shape[0])

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        items_per_micro: float,
        reference: Any = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        start = label_window(labels)
        logits = model(**model_inputs(batch, OBJECTIVE_KEYS), logits_to_keep=labels.shape[1] - start).logits
        nll_BT, mask_BT = token_nll(logits, labels[:, start:])
        if self.cfg.normalize == "token":
            total = nll_BT.sum()
        else:
            total = (nll_BT.sum(1) / mask_BT.sum(1).clamp(min=1)).sum()
        loss = total / items_per_micro
        return loss, {"loss": loss.detach()}
