"""`grpo`: group-relative policy optimisation for captioning (arXiv 2503.01333).

Per image, G completions are sampled; advantage (r - mean_g) / (std_g + eps) (NaN -> 0); per token
    -[min(rho A, clip(rho, 1 - eps, 1 + eps) A) - beta * k3],  k3 = exp(ref - logp) - (ref - logp) - 1,
rho = exp(logp - logp_old), summed over the step's completion tokens / their count. Paper defaults:
G 5, eps 0.2, beta 0.04, reward CIDEr-D, frozen reference = the XE checkpoint, 2 passes over the buffer.

Where rlalign departs from the paper, and why:
- Buffer: the paper fills a buffer of 640 images, then updates on mini-batches of 8 images. Here the
  buffer is one loop step (per_device_batch_size x grad_accum_steps images per rank), split into
  `minibatches` updates per pass: buffer size is a recipe choice, not a constant.
- Normalisation: token-level over the whole optimizer step on all ranks (the loop's items
  normaliser), so accumulation and data parallelism give the single-batch gradient; the paper's
  per-mini-batch token mean is the same when one micro-batch makes a step. `normalize: sequence`
  averages per-sequence means instead.
- Std: unbiased sample std (as TRL); `scale_by_std: false` keeps only r - mean (Dr. GRPO).
- Sampling: seeded per (image, sample), so the same samples come out under any number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from rlalign.objectives.base import ObjectiveBase, ObjectiveContext, register_objective
from rlalign.ops import masked_mean, reduce_loss
from rlalign.rollout.advantage import group_normalized
from rlalign.rollout.engine import build_engine, completion_items, completion_logprobs


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    adv_N: torch.Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [N, L] and per-token stats (kl, clipped, ratio), in the inputs' dtype."""
    ratio = torch.exp(logp - old_logp)
    adv = adv_N.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    was_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return loss, {"kl": kl.detach(), "clipped": was_clipped.to(logp.dtype), "ratio": ratio.detach()}


@dataclass(kw_only=True)
class GRPOConfig:
    """Group-relative policy optimisation (defaults: arXiv 2503.01333)."""

    group_size: int = 5
    """Samples per image (G)."""
    clip_eps: float = 0.2
    """Ratio clipping: min(rho A, clip(rho, 1 - eps, 1 + eps) A)."""
    beta: float = 0.04
    """Weight of the k3 KL to the frozen reference (0: no reference forward)."""
    std_eps: float = 1e-5
    """Added to the group std when dividing the advantage."""
    scale_by_std: bool = True
    """Divide the centred reward by the group std (false: r - mean only)."""
    normalize: Literal["token", "sequence"] = "token"
    """`token`: sum over the step's completion tokens / their count (paper); `sequence`: mean of per-sequence means."""
    inner_epochs: int = 2
    """Passes of optimizer updates over each rollout buffer."""
    minibatches: int = 1
    """Optimizer updates per pass: each rollout micro-batch is split in this many parts."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if self.clip_eps <= 0 or self.beta < 0 or self.std_eps < 0:
            raise ValueError("need clip_eps > 0, beta >= 0, std_eps >= 0")
        if self.inner_epochs < 1 or self.minibatches < 1:
            raise ValueError("inner_epochs and minibatches must be >= 1")


@register_objective
class GRPOObjective(ObjectiveBase):
    name: ClassVar[str] = "grpo"
    config_class: ClassVar[type] = GRPOConfig
    data_kind: ClassVar[str] = "images"
    needs_reference: ClassVar[bool] = True
    cfg: GRPOConfig

    @classmethod
    def requires_reference(cls, cfg: GRPOConfig) -> bool:
        """The k3 KL term needs the reference; beta 0 runs without one."""
        return cfg.beta > 0

    def __init__(self, cfg: GRPOConfig, ctx: ObjectiveContext):
        super().__init__(cfg, ctx)
        self.inner_epochs = cfg.inner_epochs
        self.engine = build_engine(ctx.recipe, ctx.processor)

    def advantage(self, rewards_N: torch.Tensor, greedy_B: torch.Tensor | None) -> torch.Tensor:
        return group_normalized(
            rewards_N, self.cfg.group_size, eps=self.cfg.std_eps, scale_by_std=self.cfg.scale_by_std
        )

    def rollout(
        self, model: Any, window: list[dict], *, step: int, runtime: Any, reference: Any = None
    ) -> tuple[list[dict], dict[str, float]]:
        return self.engine(
            model,
            window,
            step=step,
            runtime=runtime,
            group_size=self.cfg.group_size,
            with_greedy=False,
            advantage=self.advantage,
            old_logp=True,
            reference=reference if self.cfg.beta > 0 else None,
            minibatches=self.cfg.minibatches,
        )

    def count_items(self, batch: dict) -> float:
        return completion_items(batch, self.cfg.normalize)

    def loss(
        self, model: Any, batch: dict, *, items_per_micro: float, reference: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, entropy = completion_logprobs(model, batch, entropy=True)
        mask = batch["completion_mask"]
        per_token, st = grpo_token_loss(
            logp,
            batch["old_logp"],
            batch.get("ref_logp"),
            batch["advantages"],
            self.cfg.clip_eps,
            self.cfg.beta,
        )
        loss = reduce_loss(per_token, mask, self.cfg.normalize) / items_per_micro
        return loss, {
            "loss": loss.detach(),
            "kl": masked_mean(st["kl"], mask),
            "clip_frac": masked_mean(st["clipped"], mask),
            "entropy": masked_mean(entropy, mask),
            "ratio_mean": masked_mean(st["ratio"], mask),
        }
