"""`rdpo`: RE-ALIGN's retrieval-augmented DPO (arXiv 2502.13146).

L = w_dpo * -log sigma(beta [D(y_w|x,v) - D(y_l|x,v)])            (text preference, DPO)
  + w_vis * -log sigma(beta [D(y_w|x,v) - D(y_w|x,v_l)])          (visual preference)
  [+ w_anc * -log sigma(beta D(y_w|x,v) - delta)]                  (mDPO-style anchor, off by default)
with D(y|x,v) = log pi(y|x,v) - log pi_ref(y|x,v), v the true image and v_l the retrieved one.

Where it departs from the paper:
- The paper has no anchor term; `anchor_weight > 0` adds mDPO's (Wang et al. 2024) anchor on the
  chosen reward. Default 0, so the default loss is the paper's, with weights 1 and 1 configurable.
- `label_smoothing` (cDPO) applies to both preference terms; 0 (the paper) by default.
- Packing: the true-image row holds prompt | y_w | y_l (image encoded once); the retrieved image
  gets one row prompt' | y_w (encoded once); both rows go through one forward.
- Normalisation: summed over pairs, divided by the step's pair count (objectives/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from rlalign.objectives.base import register_objective
from rlalign.objectives.dpo import DPOConfig, DPOObjective, preference_terms


def rdpo_terms(logps: torch.Tensor, ref: torch.Tensor, cfg: RDPOConfig) -> tuple[torch.Tensor, dict]:
    """Per-pair loss from packed (2B, 2) log-probs: rows [:B] = (y_w, y_l | v), rows [B:] = (y_w | v_l, -)."""
    B = logps.shape[0] // 2
    w, lo, w_vl = logps[:B, 0], logps[:B, 1], logps[B:, 0]
    rw, rl, rw_vl = ref[:B, 0], ref[:B, 1], ref[B:, 0]
    text, m_text = preference_terms(w, lo, rw, rl, cfg.beta, cfg.label_smoothing)
    visual, m_vis = preference_terms(w, w_vl, rw, rw_vl, cfg.beta, cfg.label_smoothing)
    loss = cfg.dpo_weight * text + cfg.visual_weight * visual
    metrics = {
        **{f"rewards/{k}": v.mean() for k, v in m_text.items()},
        **{f"visual/{k}": v.mean() for k, v in m_vis.items()},
    }
    metrics["visual/rejected"] = m_vis["rejected"].mean()  # reward of y_w under the retrieved image
    if cfg.anchor_weight > 0:
        anchor = -F.logsigmoid(cfg.beta * (w - rw) - cfg.anchor_delta)
        loss = loss + cfg.anchor_weight * anchor
        metrics["anchor/loss"] = anchor.detach().mean()
    metrics["dpo/loss"], metrics["visual/loss"] = text.detach().mean(), visual.detach().mean()
    return loss, metrics


@dataclass(kw_only=True)
class RDPOConfig(DPOConfig):
    """RE-ALIGN's retrieval-augmented DPO: the DPO term + a visual term (chosen under the true vs the retrieved image)."""

    dpo_weight: float = 1.0
    """Weight of the DPO (text preference) term."""
    visual_weight: float = 1.0
    """Weight of the visual term -log sigmoid(beta [D(y_w|x,v) - D(y_w|x,v_l)])."""
    anchor_weight: float = 0.0
    """Weight of an mDPO-style anchor -log sigmoid(beta D(y_w|x,v) - anchor_delta) (0: off, as in the paper)."""
    anchor_delta: float = 0.0
    """Anchor threshold delta of the anchor term."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.dpo_weight, self.visual_weight, self.anchor_weight) < 0:
            raise ValueError("dpo_weight, visual_weight and anchor_weight must be >= 0")


@register_objective
class RDPOObjective(DPOObjective):
    name: ClassVar[str] = "rdpo"
    config_class: ClassVar[type] = RDPOConfig
    uses_retrieved: ClassVar[bool] = True
    cfg: RDPOConfig

    def terms(self, logps: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return rdpo_terms(logps, ref, self.cfg)
