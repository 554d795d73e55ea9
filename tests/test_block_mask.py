"""Packed rows under flex attention: the language model gets a BlockMask, and the log-probs equal the dense mask's.

For the packing families that have a flex-attention path in transformers (Llava, LLaVA-NeXT, Idefics3; tiny
checkpoints of tests/families.py, float32): DPO's packed log-probs and gradients, and the shared-prefix GRPO
completion log-probs, under `flex_attention` (BlockMask) equal the same packed forward under `eager` (dense
4-D mask) and the unpacked forward; a spy on the first decoder layer sees a BlockMask, not a tensor. Qwen2-VL
and Qwen2.5-VL have no flex path (transformers refuses it at load): preflight refuses it in one line.

transformers compiles flex attention on first use (10-20 s per shape on a 2-core CPU), so the default tests
run torch's uncompiled flex kernel (`uncompiled_flex`: the same mask and score semantics, the score matrix
materialised); the slow test runs the compiled CPU kernel through transformers as it stands, the gpu test
the Triton one.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.flex_attention as hf_flex
from families import FAMILIES
from test_families import expected_logps, pairs
from test_shared_prefix import GROUP, rollout
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import rlalign.objectives.dpo as dpo
from rlalign.config import RecipeError
from rlalign.config.schema import ModelConfig
from rlalign.data.preference import PreferenceCollator
from rlalign.models import packing
from rlalign.models.builder import load_base
from rlalign.preflight import check_flex_attention
from rlalign.rollout.engine import _sequences, completion_logprobs
from rlalign.rollout.shared_prefix import pack_groups
from rlalign.utils.tensors import to_device

FLEX = ("llava", "llava_next", "idefics3")
"""Packing families with a flex-attention path in transformers 5.x."""
TOL = 2e-5
"""|flex BlockMask - eager dense| on a sequence's summed log-prob (float32, sums of ~60 nats): the two
kernels add the same terms in another order; measured up to 7.6e-6 (llava_next)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in (*FLEX, "qwen2_vl"):
        out[name] = tmp_path_factory.mktemp(name)
        FAMILIES[name](out[name])
    return out


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers' flex attention without its torch.compile: torch's flex kernel in eager mode."""

    def call(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", call)


def models(path: Path):
    """(flex-attention model, eager model, processor) of one checkpoint, in eval mode."""
    flex, processor = load_base(ModelConfig(name_or_path=str(path), attn_implementation="flex_attention"))
    eager, _ = load_base(ModelConfig(name_or_path=str(path), attn_implementation="eager"))
    return flex.eval(), eager.eval(), processor


class MaskSpy:
    """The attention_mask each forward hands the language model's first decoder layer."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list = []
        model.get_decoder().layers[0].register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.seen.append(kwargs["attention_mask"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def dpo_logps_and_grads(model, batch, grads: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.set_grad_enabled(grads):
        logps = dpo.sequence_logps(model, batch, "sum", torch.float32)
    if grads:
        logps.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_dpo(flex, eager, processor, device: str = "cpu") -> str:
    """Packed DPO rows (pairs and retrieved-image rows) on `device`: flex (BlockMask) against eager (dense)
    log-probs, and against each sequence's own forward (on the CPU); gradients too off the CPU (torch's
    flex attention has no backward on CPU)."""
    with torch.no_grad():  # the independent oracle: each sequence alone, the family's own forward
        expected = expected_logps(eager, processor)
    flex, eager = flex.to(device), eager.to(device)
    spy = MaskSpy(flex)
    batch = to_device(PreferenceCollator(processor, 48, None, retrieved=True, packed=True)(pairs()), device)
    grads = device != "cpu"
    block, grad_block = dpo_logps_and_grads(flex, batch, grads)
    dense, grad_dense = dpo_logps_and_grads(eager, batch, grads)
    assert [type(m) for m in spy.seen] == [BlockMask]
    assert spy.seen[0].shape == (4, 1, *batch["input_ids"].shape[1:] * 2)
    d = max_diff(block, dense)
    assert d < TOL, d
    torch.testing.assert_close(block.cpu(), expected, rtol=1e-6, atol=1e-5)
    if not grads:
        return f"DPO logps |diff| {d:.1e}"
    assert grad_block.keys() == grad_dense.keys() and grad_block
    worst = max(max_diff(grad_block[n], grad_dense[n]) for n in grad_block)
    scale = max(float(g.abs().max()) for g in grad_dense.values())
    assert worst < 1e-5 * max(scale, 1.0), (worst, scale)
    return f"DPO logps |diff| {d:.1e}, grads {worst:.1e} (max grad {scale:.1e})"


def check_shared_prefix(flex, eager, processor, device: str = "cpu") -> str:
    """Shared-prefix GRPO rows of a rollout (sampled on the CPU) on `device`: flex (BlockMask) against eager
    (dense) and against the unpacked rows, per completion token."""
    batch, comp, mask = rollout(eager.cpu(), processor, torch.float32)
    packed = to_device(pack_groups(eager, batch, comp, mask, GROUP), device)
    unpacked = to_device(_sequences(batch, comp, mask, GROUP), device)
    flex, eager, mask = flex.to(device), eager.to(device), mask.to(device)
    spy = MaskSpy(flex)
    with torch.no_grad():
        block = completion_logprobs(flex, packed)[0] * mask
        dense = completion_logprobs(eager, packed)[0] * mask
        unpacked = completion_logprobs(eager, unpacked)[0] * mask
    assert [type(m) for m in spy.seen] == [BlockMask]
    d = max_diff(block, dense)
    assert d < 1e-5, d  # per token
    assert max_diff(block, unpacked) < 1e-5
    return f"GRPO shared-prefix logps |diff| {d:.1e} per token"


@pytest.mark.parametrize("family", FLEX)
def test_dpo_pairs_under_a_block_mask(checkpoints, family, uncompiled_flex):
    print(family, check_dpo(*models(checkpoints[family])))


@pytest.mark.parametrize("family", FLEX)
def test_shared_prefix_groups_under_a_block_mask(checkpoints, family, uncompiled_flex):
    print(family, check_shared_prefix(*models(checkpoints[family])))


def test_block_mask_equals_the_dense_mask_across_blocks():
    """Rows of 700 tokens (6 blocks, the last partial), left padding, responses past their end, responses
    longer than a block: the same attention as the dense mask, and more blocks skipped than causal alone
    (a late response's queries skip the blocks of an earlier response)."""
    spans = [
        [(-1, 5), (0, 95), (1, 300), (2, 290), (-1, 10)],
        [(0, 100), (1, 250), (-1, 50), (2, 150), (3, 150)],
    ]
    seg = torch.stack([torch.cat([torch.full((n,), s) for s, n in row]) for row in spans])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, seg.shape[1], 16, generator=gen) for _ in range(3))
    block = packing.packed_block_mask(seg)
    got = flex_attention(q, k, v, block_mask=block)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.packed_mask(seg, torch.float32))
    assert max_diff(got, dense) < 1e-6
    causal = packing.packed_block_mask(torch.zeros_like(seg))
    assert block.shape == (2, 1, 700, 700) and block.sparsity() > causal.sparsity() + 5


def test_flex_attention_refused_where_transformers_has_no_path(checkpoints):
    check_flex_attention(
        ModelConfig(name_or_path=str(checkpoints["llava"]), attn_implementation="flex_attention")
    )
    qwen = ModelConfig(name_or_path=str(checkpoints["qwen2_vl"]), attn_implementation="flex_attention")
    with pytest.raises(RecipeError, match="'flex_attention' has no path in transformers for Qwen2VL"):
        check_flex_attention(qwen)
    with pytest.raises(ValueError, match="does not support an attention implementation through torch's flex"):
        load_base(qwen)  # what the refusal stands in for: it goes once transformers adds the path


@pytest.mark.slow
@pytest.mark.parametrize("family", FLEX)
def test_compiled_flex_kernel(checkpoints, family):
    """transformers' own path: flex attention compiled by inductor for this CPU (~20 s per family). One
    static kernel per shape: torch 2.13's dynamic-shape recompile of the CPU flex kernel (a second batch
    size) fails to build (C++ compile error, `cur_qSplitSize` undeclared), whatever the mask_mod reads."""
    flex, eager, processor = models(checkpoints[family])
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        print(family, check_dpo(flex, eager, processor), check_shared_prefix(flex, eager, processor))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FLEX)
def test_flex_kernel_on_gpu(checkpoints, family):
    """The Triton kernel (block sizes, partial last block, the mask_mod reading padded segment ids)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    flex, eager, processor = models(checkpoints[family])
    dpo_report = check_dpo(flex, eager, processor, "cuda")
    print(family, dpo_report, check_shared_prefix(flex, eager, processor, "cuda"))
