"""`dpo`: direct preference optimisation, sigmoid loss (Rafailov et al. 2023) for VLMs.

L = -(1 - eps) log sigma(beta [D(y_w) - D(y_l)]) - eps log sigma(-beta [D(y_w) - D(y_l)]),
D(y) = log pi(y|x,v) - log pi_ref(y|x,v), eps = label_smoothing (0 = the paper; eps > 0 is cDPO).

Where it departs from the paper / from TRL:
- Chosen and rejected share one packed row (prompt | chosen | rejected, 4D mask, each response at the
  positions of its unpacked sequence, M-RoPE included): the image is encoded and the prompt is run once
  per pair. The log-probs are those of two separate sequences (same masks, same positions), gathered
  exactly at the label tokens. Families that do not pack get one row per response (`PreferenceCollator`).
- `logp_reduction: mean` optionally averages over response tokens instead of summing (paper: sum).
- The loss is summed over pairs and divided by the step's pair count over all micro-batches and
  ranks (see objectives/base.py), so accumulation / data parallelism give the single-batch gradient.
- Reference log-probs can come from an on-disk cache (`ref_cache_dir`), see `ref_cache.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from rlalign.data.preference import FIRST, PAD_SEGMENT, PROMPT, SECOND
from rlalign.models.packing import packed_attention_mask, segment_positions
from rlalign.objectives.base import ObjectiveBase, ObjectiveContext, register_objective
from rlalign.objectives.ref_cache import RefLogpCache
from rlalign.ops import reduce_sequences, token_logprobs
from rlalign.ops.logprobs import kept_positions

PACKING_KEYS = (
    "segment_ids",
    "pred_pos",
    "is_retrieved",
    "pair_keys",
    "attention_mask",
    "logp_row",
    "packed",
)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """Dtype of the policy's floating parameters (a dense additive mask must match the attention's)."""
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def forward_inputs(model: Any, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The forward's inputs: packed rows get the segment mask (4-D, or a BlockMask under flex attention) and
    each segment's positions (M-RoPE from
    the model's own rope index); unpacked rows are the family's ordinary forward (2D mask, the model's
    own positions and attention rules, such as Gemma 3's bidirectional image blocks)."""
    inputs = {k: v for k, v in batch.items() if k not in PACKING_KEYS}
    if not batch["packed"]:
        inputs.pop("position_ids")
        return {**inputs, "attention_mask": batch["attention_mask"]}
    inputs["attention_mask"] = packed_attention_mask(model, batch["segment_ids"], dtype, PROMPT, PAD_SEGMENT)
    positions = segment_positions(model, batch, PROMPT, (FIRST, SECOND))
    if positions is not None:
        inputs["position_ids"] = positions
    return inputs


def sequence_logps(model: Any, batch: dict[str, Any], reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """(N, 2) log-probs of the first and second response of each log-prob row (0 where absent), one root
    forward over the batch's model rows (packed or not, see `PreferenceCollator`)."""
    seg = batch["segment_ids"]
    # logits only where a response token is scored: row n's position pred_pos[n, t] predicts input_ids[n, t]
    positions, index, valid = kept_positions((seg == FIRST) | (seg == SECOND), batch["pred_pos"])
    inputs = forward_inputs(model, batch, dtype)
    logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits  # (rows, K, V)
    logp_NK = token_logprobs(logits, batch["input_ids"].gather(1, index))
    seg_K = seg.gather(1, index).masked_fill(~valid, PAD_SEGMENT)
    per_row = torch.stack([reduce_sequences(logp_NK, seg_K == s, reduction) for s in (FIRST, SECOND)], 1)
    rows = batch["is_retrieved"].shape[0]
    logp_row = torch.tensor(batch["logp_row"], device=per_row.device)
    return per_row.new_zeros(rows, 2).index_add(0, logp_row, per_row)


def ref_logps(
    reference: Any, batch: dict[str, Any], cache: RefLogpCache | None, reduction: str, dtype: torch.dtype
) -> torch.Tensor:
    """Reference (N, 2) log-probs: from the cache when every pair of the batch is in it, else one
    reference forward (whose results the cache stores)."""
    keys = cache.keys(batch) if cache is not None else []
    if cache is not None:
        hit = cache.lookup(keys, reference)
        if hit is not None:
            return hit.to(batch["input_ids"].device)
    with torch.no_grad():
        logps = sequence_logps(reference, batch, reduction, dtype)
    if cache is not None:
        cache.store(keys, logps)
    return logps


def preference_terms(logp_w, logp_l, ref_w, ref_l, beta: float, eps: float) -> tuple[torch.Tensor, dict]:
    """Per-pair sigmoid loss of (w over l) and its reward metrics."""
    rw, rl = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
    margin = rw - rl
    loss = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
    metrics = {
        "chosen": rw.detach(),
        "rejected": rl.detach(),
        "margins": margin.detach(),
        "accuracies": (margin.detach() > 0).float(),
    }
    return loss, metrics


@dataclass(kw_only=True)
class DPOConfig:
    """Direct preference optimisation (sigmoid loss) on (image, prompt, chosen, rejected)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward beta * (log pi - log pi_ref)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the preference label is flipped with this probability (0 = plain DPO)."""
    logp_reduction: Literal["sum", "mean"] = "sum"
    """Sequence log-prob: sum over response tokens (the paper), or their mean."""
    ref_cache_dir: str | None = None
    """Cache reference log-probs on disk here, keyed by (image hash, token ids, reference fingerprint):
    each pair runs the reference once, later epochs and runs read the cache. None: live reference."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@register_objective
class DPOObjective(ObjectiveBase):
    name: ClassVar[str] = "dpo"
    config_class: ClassVar[type] = DPOConfig
    data_kind: ClassVar[str] = "preferences"
    needs_reference: ClassVar[bool] = True
    cfg: DPOConfig

    def __init__(self, cfg: DPOConfig, ctx: ObjectiveContext | None = None):
        super().__init__(cfg, ctx)
        self.cache = RefLogpCache(cfg.ref_cache_dir, cfg.logp_reduction) if cfg.ref_cache_dir else None

    def count_items(self, batch: dict[str, Any]) -> float:
        return float(len(batch["pair_keys"]))

    def loss(
        self, model, batch, *, items_per_micro: float, reference: Any = None
    ) -> tuple[torch.Tensor, dict]:
        dtype = compute_dtype(model)
        logps = sequence_logps(model, batch, self.cfg.logp_reduction, dtype)
        ref = ref_logps(reference, batch, self.cache, self.cfg.logp_reduction, dtype)
        per_pair, metrics = self.terms(logps, ref)
        loss = per_pair.sum() / items_per_micro
        return loss, {"loss": loss.detach(), **metrics}

    def terms(self, logps: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-pair losses and metrics from policy and reference log-probs [pairs, sequences]."""
        per_pair, m = preference_terms(
            logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], self.cfg.beta, self.cfg.label_smoothing
        )
        metrics = {f"rewards/{k}": v.mean() for k, v in m.items()}
        metrics["logps/chosen"], metrics["logps/rejected"] = (
            logps[:, 0].detach().mean(),
            logps[:, 1].detach().mean(),
        )
        return per_pair, metrics
