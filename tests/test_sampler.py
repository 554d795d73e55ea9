"""Data order is a pure function of the step: layouts that share a global batch see the same samples."""

from __future__ import annotations

import pytest
import torch

from rlalign.trainer.data import StepSampler, eval_shard


def _step_samples(n, micro, world, accum, step, seed=0):
    out = []
    for rank in range(world):
        s = StepSampler(
            n, micro=micro, world=world, rank=rank, accum=accum, seed=seed, start_step=0, end_step=10
        )
        for j in range(accum):
            out += s.indices(step, j)
    return sorted(out)


def test_same_global_batch_for_every_layout():
    for step in range(7):
        ref = _step_samples(50, 8, 1, 1, step)
        assert _step_samples(50, 4, 2, 1, step) == ref
        assert _step_samples(50, 1, 1, 8, step) == ref
        assert _step_samples(50, 2, 2, 2, step) == ref


def test_epochs_are_permutations_and_resume_is_a_suffix():
    s = StepSampler(12, micro=4, world=1, rank=0, accum=1, seed=5, start_step=0, end_step=6)
    batches = list(s)
    assert sorted(sum(batches[:3], [])) == list(range(12)) and sorted(sum(batches[3:], [])) == list(range(12))
    assert sum(batches[:3], []) != sum(batches[3:], [])  # a new order each epoch
    resumed = StepSampler(12, micro=4, world=1, rank=0, accum=1, seed=5, start_step=4, end_step=6)
    assert list(resumed) == batches[4:]


def test_eval_shard_pads_to_equal_forward_counts():
    shards = [eval_shard(5, 2, r) for r in range(2)]
    assert [len(i) for i, _ in shards] == [3, 3]
    assert sorted(i for idx, w in shards for i, wt in zip(idx, w) if wt) == list(range(5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_draws_on_the_device_without_copies():
    """On CUDA the noise and the banned-token index live on the device: no host-device copy per token (the
    profiler's memcpy events over ten calls)."""
    from torch.profiler import ProfilerActivity, profile

    from rlalign.config.schema import RolloutConfig
    from rlalign.rollout.sampling import SeededSampler

    scores = torch.randn(6, 5000, device="cuda")
    ids = torch.zeros(6, 3, dtype=torch.long, device="cuda")
    sampler = SeededSampler(list(range(6)), RolloutConfig(), banned=[0])
    sampler(ids, scores)  # creates the generators
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            out = sampler(ids, scores)
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events()]
    copies = [n for n in names if "memcpy" in n and ("htod" in n or "dtoh" in n)]
    assert not copies, copies
    assert out.shape == scores.shape
