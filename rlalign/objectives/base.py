"""The objective interface: what the trainer knows about any objective.

An objective gets a micro-batch, the policy and (when it declares it needs one) the reference
handle, and returns `(loss, metrics)`. It never touches the launcher, the tracker or checkpoints.

Normalisation: the trainer counts the objective's items (tokens, sequences...) over the whole
optimizer step on every rank and passes `items_per_micro` = that total / (micro-batches x ranks).
An objective divides its summed loss by it, so after accelerate's division by the accumulation
steps and the ranks' gradient averaging the step optimises sum / total: batch 4 x 1 accumulation
and batch 1 x 4 accumulation give the same gradient.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch


class Objective(Protocol):
    name: ClassVar[str]
    needs_reference: ClassVar[bool]
    needs_rollout: ClassVar[bool]
    data_kind: ClassVar[str]
    """Key of `rlalign.data.DATA_KINDS`: what the objective trains on."""

    @classmethod
    def requires_reference(cls, cfg: Any) -> bool:
        """Whether a run with these settings scores against a reference policy (checked by `validate`)."""

    def count_items(self, batch: dict[str, torch.Tensor]) -> float:
        """The number this micro-batch contributes to the step's normaliser."""

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        items_per_micro: float,
        reference: Any = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss to backpropagate and detached metrics (averaged over micro-batches and ranks)."""
