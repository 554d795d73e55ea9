"""Shared-prefix GRPO rows ([prompt | c1 | ... | cG], one per group) against the unpacked rollout rows
(prompt + completion per row, image inputs repeated G times), on every family that packs: completion
log-probs, the GRPO loss and every parameter's gradient, in float64 (tiny random checkpoints of
tests/families.py). Prompts are left-padded to different lengths and images differ in size, so padding,
per-image inputs and the M-RoPE positions of Qwen2-VL / Qwen2.5-VL are all exercised; completions end at
different lengths, so padding inside the completions is too. The loop-level check (2-process ZeRO-3 packed
against single-process unpacked) is in tests/test_rl_distributed.py."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from families import FAMILIES, images

from rlalign.config.schema import ModelConfig, RolloutConfig
from rlalign.data.collate import encode_prompts
from rlalign.models.builder import load_base
from rlalign.objectives.grpo import grpo_token_loss
from rlalign.ops import reduce_loss
from rlalign.rollout.engine import _packed_parts, _sequences, completion_logprobs
from rlalign.rollout.sampling import completion_mask, sample_groups
from rlalign.rollout.shared_prefix import PAD, pack_groups, supports_shared_prefix

PACKED = [f for f in FAMILIES if f != "gemma3"]
PROMPTS = ["describe the image", "what is in the picture shown here , in a few words"]
GROUP = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in PACKED:
        out[name] = tmp_path_factory.mktemp(name)
        FAMILIES[name](out[name])
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def rollout(model, processor, dtype: torch.dtype = torch.float64):
    """Two prompts (left-padded to one length), G samples each, image inputs in `dtype` (the model's)."""
    batch = dict(encode_prompts(processor, images(), PROMPTS))
    batch = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in batch.items()}
    tok = processor.tokenizer
    with torch.no_grad():
        comp = sample_groups(
            model, batch, list(range(2 * GROUP)), GROUP, RolloutConfig(max_new_tokens=7), tok
        )
    # random weights seldom sample the end token: end two completions early, as a trained model would
    comp[1, 2] = comp[4, 4] = tok.eos_token_id
    mask = completion_mask(comp, tok.eos_token_id)
    return batch, comp, mask


def grpo_loss(model, mb, old, ref, adv):
    logp, _ = completion_logprobs(model, mb)
    per_token, _ = grpo_token_loss(logp, old, ref, adv, clip_eps=0.2, beta=0.04)
    return reduce_loss(per_token, mb["completion_mask"], "token"), logp


@pytest.mark.parametrize("family", PACKED)
def test_packed_groups_equal_unpacked_rows(checkpoints, family):
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints[family])))
    model = model.double().eval()
    assert supports_shared_prefix(processor, "sdpa") and not supports_shared_prefix(
        processor, "flash_attention_2"
    )
    batch, comp, mask = rollout(model, processor)
    assert (batch["attention_mask"] == 0).any(), "the prompts should be padded to one length"
    assert len(set(mask.sum(1).tolist())) > 1, "completions of different lengths"
    packed = pack_groups(model, batch, comp, mask, GROUP)
    unpacked = _sequences(batch, comp, mask, GROUP)
    assert packed["input_ids"].shape == (2, batch["input_ids"].shape[1] + GROUP * comp.shape[1])
    assert int((packed["segment_ids"] > 0).sum()) == int(mask.sum())
    assert int((packed["segment_ids"] == PAD).sum()) == int(
        (batch["attention_mask"] == 0).sum() + (mask == 0).sum()
    )

    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    ref = -torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(mask.shape[0], generator=gen, dtype=torch.float64)
    results = []
    for mb in (unpacked, packed):
        model.zero_grad()
        loss, logp = grpo_loss(model, mb, old, ref, adv)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), (logp * mask).detach(), grads))
    (loss_u, logp_u, grad_u), (loss_p, logp_p, grad_p) = results
    logp_diff = float((logp_u - logp_p).abs().max())
    assert logp_diff < 1e-9, logp_diff
    assert float(loss_p) == pytest.approx(float(loss_u), abs=1e-9)
    assert grad_u.keys() == grad_p.keys() and len(grad_u) > 0
    grad_diff = max(float((grad_u[n] - grad_p[n]).abs().max()) for n in grad_u)
    scale = max(float(g.abs().max()) for g in grad_u.values())
    # not float64 round-off: the families' RMSNorm computes in float32 even for float64 weights, which
    # rounds each token's gradient to float32; packed rows sum the shared prompt's gradient over the group
    # before that rounding, unpacked rows after it (observed ~4e-8 of the largest gradient)
    assert grad_diff < 1e-6 * max(scale, 1.0), (grad_diff, scale)
    print(
        f"{family}: packed vs unpacked |d logp| {logp_diff:.1e}, |d grad| {grad_diff:.1e} (max grad {scale:.2e})"
    )
    # the pieces of a packed micro-batch are whole groups with their own images
    parts = _packed_parts(model, batch, comp, mask, adv, GROUP, 2)
    got = torch.cat([completion_logprobs(model, mb)[0] for mb in parts]) * mask
    assert float((got - logp_u).abs().max()) < 1e-9


def test_packed_rows_hold_each_image_once(checkpoints):
    """The point of packing: the packed forward sees each image and prompt once, not G times."""
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints["llava"])))
    batch, comp, mask = rollout(model.double(), processor)
    packed, unpacked = pack_groups(model, batch, comp, mask, GROUP), _sequences(batch, comp, mask, GROUP)
    assert packed["pixel_values"].shape[0] == 2 and unpacked["pixel_values"].shape[0] == 2 * GROUP
    P, L = batch["input_ids"].shape[1], comp.shape[1]
    assert packed["input_ids"].numel() == 2 * (P + GROUP * L)
    assert unpacked["input_ids"].numel() == 2 * GROUP * (P + L)


def test_minibatches_must_hold_whole_groups(checkpoints):
    model, processor = load_base(ModelConfig(name_or_path=str(checkpoints["llava"])))
    batch, comp, mask = rollout(model.double(), processor)
    with pytest.raises(ValueError, match="2 images per micro-batch do not split into 3 minibatches"):
        _packed_parts(model, batch, comp, mask, torch.zeros(2 * GROUP), GROUP, 3)
