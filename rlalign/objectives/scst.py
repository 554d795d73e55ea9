"""`scst`: self-critical sequence training (Rennie et al. 2017).

Loss per token: -A * log pi(token), A = r(sample) - r(greedy decode of the same image), where
the greedy decode runs under the current policy in the same rollout; `baseline: group_mean`
uses the mean reward of the image's other samples instead (no greedy decode; "leave one out").

Where rlalign departs from the paper, and why:
- Normalisation: the paper sums log-probs per sequence and averages over images; here `token`
  (default) divides the summed loss by the step's completion-token count over all ranks (the
  loop's items normaliser, exact under accumulation and data parallelism), `sequence` averages
  per-sequence means. Both only rescale the gradient per step.
- Reward: CIDEr-D with df cached from the training references (as the paper's code), plus any
  other weighted reward terms of the recipe.
- Sampling shares GRPO's rollout path (seeded per image and sample), one optimizer update per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from rlalign.objectives.base import ObjectiveBase, ObjectiveContext, register_objective
from rlalign.ops import masked_mean, reduce_loss
from rlalign.rollout.advantage import greedy_baseline, leave_one_out
from rlalign.rollout.engine import build_engine, completion_items, completion_logprobs


def scst_token_loss(logp: torch.Tensor, adv_N: torch.Tensor) -> torch.Tensor:
    """Per-token REINFORCE loss [N, L]: -A * log-prob."""
    return -adv_N.to(logp.dtype).unsqueeze(1) * logp


@dataclass(kw_only=True)
class SCSTConfig:
    """Self-critical sequence training (Rennie et al. 2017)."""

    baseline: Literal["greedy", "group_mean"] = "greedy"
    """`greedy`: advantage = r(sample) - r(greedy decode); `group_mean`: minus the mean of the image's other samples."""
    num_samples: int = 1
    """Samples per image (`group_mean` needs at least 2)."""
    normalize: Literal["token", "sequence"] = "token"
    """Loss normalisation: per completion token of the step, or per sequence."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or (self.baseline == "group_mean" and self.num_samples < 2):
            raise ValueError(f"num_samples must be >= 1 (>= 2 for group_mean), got {self.num_samples}")


@register_objective
class SCSTObjective(ObjectiveBase):
    name: ClassVar[str] = "scst"
    config_class: ClassVar[type] = SCSTConfig
    data_kind: ClassVar[str] = "images"
    cfg: SCSTConfig
    inner_epochs: int = 1

    def __init__(self, cfg: SCSTConfig, ctx: ObjectiveContext):
        super().__init__(cfg, ctx)
        self.engine = build_engine(ctx.recipe, ctx.processor)

    def advantage(self, rewards_N: torch.Tensor, greedy_B: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.baseline == "greedy":
            return greedy_baseline(rewards_N, greedy_B, self.cfg.num_samples)
        return leave_one_out(rewards_N, self.cfg.num_samples)

    def rollout(
        self, model: Any, window: list[dict], *, step: int, runtime: Any, reference: Any = None
    ) -> tuple[list[dict], dict[str, float]]:
        return self.engine(
            model,
            window,
            step=step,
            runtime=runtime,
            group_size=self.cfg.num_samples,
            with_greedy=self.cfg.baseline == "greedy",
            advantage=self.advantage,
            old_logp=False,
        )

    def count_items(self, batch: dict) -> float:
        return completion_items(batch, self.cfg.normalize)

    def loss(
        self, model: Any, batch: dict, *, items_per_micro: float, reference: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, entropy = completion_logprobs(model, batch, entropy=True)
        mask = batch["completion_mask"]
        loss = (
            reduce_loss(scst_token_loss(logp, batch["advantages"]), mask, self.cfg.normalize)
            / items_per_micro
        )
        return loss, {"loss": loss.detach(), "entropy": masked_mean(entropy, mask)}
