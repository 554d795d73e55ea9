"""`xe`: cross-entropy on reference captions / responses (the warm start of every RL run).

Departure from a plain HF `labels=` forward: the loss is summed here and divided by the step's
token (or sequence) count over all micro-batches and ranks, so gradient accumulation and data
parallelism give exactly the single-batch gradient (HF's per-micro-batch mean does not).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from rlalign.config.schema import XEConfig
from rlalign.data.collate import IGNORE
from rlalign.ops import token_logprobs
from rlalign.utils.tensors import model_inputs

OBJECTIVE_KEYS = ("labels",)
"""Batch tensors the loss reads and the model's forward does not take."""


def token_nll(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction and the mask of positions that count."""
    target = labels_BT[:, 1:]
    mask = target != IGNORE
    nll = -token_logprobs(logits_BTV[:, :-1], target.clamp(min=0))
    return nll * mask, mask


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
        logits = model(**model_inputs(batch, OBJECTIVE_KEYS)).logits
        nll_BT, mask_BT = token_nll(logits, batch["labels"])
        if self.cfg.normalize == "token":
            total = nll_BT.sum()
        else:
            total = (nll_BT.sum(1) / mask_BT.sum(1).clamp(min=1)).sum()
        loss = total / items_per_micro
        return loss, {"loss": loss.detach()}
