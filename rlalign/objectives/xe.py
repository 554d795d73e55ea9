"""`xe`: cross-entropy on reference captions / responses (the warm start of every RL run).

Departure from a plain HF `labels=` forward: the loss is summed here and divided by the step's
token (or sequence) count over all micro-batches and ranks, so gradient accumulation and data
parallelism give exactly the single-batch gradient (HF's per-micro-batch mean does not).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rlalign.config.schema import XEConfig
from rlalign.data.collate import IGNORE

MODEL_INPUTS_SKIP = ("labels",)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in MODEL_INPUTS_SKIP}


def token_nll(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction and the mask of positions that count."""
    logits = logits_BTV[:, :-1].float()
    target = labels_BT[:, 1:]
    mask = target != IGNORE
    nll = F.cross_entropy(logits.flatten(0, 1), target.clamp(min=0).flatten(), reduction="none")
    return nll.view_as(target) * mask, mask


class XEObjective:
    name: ClassVar[str] = "xe"
    needs_reference: ClassVar[bool] = False
    needs_rollout: ClassVar[bool] = False
    data_kind: ClassVar[str] = "captions"

    @classmethod
    def requires_reference(cls, cfg: Any) -> bool:
        return cls.needs_reference

    def __init__(self, cfg: XEConfig):
        self.cfg = cfg

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
        logits = model(**model_inputs(batch)).logits
        nll_BT, mask_BT = token_nll(logits, batch["labels"])
        if self.cfg.normalize == "token":
            total = nll_BT.sum()
        else:
            total = (nll_BT.sum(1) / mask_BT.sum(1).clamp(min=1)).sum()
        loss = total / items_per_micro
        return loss, {"loss": loss.detach()}
